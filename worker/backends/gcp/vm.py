"""A worker on a Google Cloud VM: how an idle one leaves its instance group, reports a VM that
cannot, and keeps its own log in the bucket.

``CFLOW_COMPUTE_ENDPOINT`` points the Compute Engine calls elsewhere (an ``http://`` endpoint is a
test fake and gets no credentials). Credentials are Application Default Credentials: the VM's
service account, never a key file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import google.auth
import google.auth.exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.retry import COMPUTE, HttpAnswer, request_id, retrying
from worker.clock import SYSTEM_CLOCK
from worker.errors import BackendError, ConfigError
from worker.store import Store

log = logging.getLogger("cflow.worker")

COMPUTE_ENDPOINT = "https://compute.googleapis.com"
COMPUTE_ENDPOINT_ENV = "CFLOW_COMPUTE_ENDPOINT"
LEAVE_GIVE_UP = 600.0  # seconds of transient refusals of the self-delete before giving up
LEAVE_TIMEOUT = 30.0  # seconds per self-delete request
# Exit status of a worker that could not remove its VM: the systemd unit does not restart it
# but powers the VM off (infra/scripts/startup.sh), and the runner deletes it by name.
EXIT_CANNOT_LEAVE = 75
PROBLEMS_PREFIX = "fleet/_problems/"  # <vm>.json: a VM that failed to boot or cannot leave
AGENT_LOG_SECONDS = 30.0  # the agent's log is uploaded this often, and at exit
# seconds a write on the way out (the agent's log, a problem report) waits out a Cloud Storage
# outage: the store's other calls wait for ever, but these must not keep an idle VM billing
# (a few jittered tries, 1 s doubling; what is lost is a log's tail, the runner still lists
# a VM that cannot leave)
EXIT_WRITE_SECONDS = 15.0


def agent_log_key(vm: str) -> str:
    """Where a VM's agent log lives in the bucket."""
    return f"fleet/{vm}/agent.log"


def problem_key(vm: str) -> str:
    return f"{PROBLEMS_PREFIX}{vm}.json"


def report_problem(store: Store, vm: str, problem: str) -> None:
    """Leave a marker the runner reads (``VM x <problem>``) and acts on (deletes the VM)."""
    record = {"vm": vm, "problem": problem, "at": time.time()}
    try:
        _bounded(store).put(problem_key(vm), json.dumps(record).encode())
    except Exception as exc:  # the power-off still stops the bill
        log.error("could not report %r to the bucket: %s", problem, exc)


class AgentLogUploader:
    """Copies the agent's own log file to ``fleet/<vm>/agent.log`` now and then, and at exit,
    so it outlives the VM (self-removal and preemption delete the disk with it)."""

    def __init__(self, store: Store, vm: str, path: Path, *, every: float = AGENT_LOG_SECONDS):
        self.store = _bounded(store)
        self.key = agent_log_key(vm)
        self.path = path
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="agent-log", daemon=True)
        self._size = -1

    def start(self) -> AgentLogUploader:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.upload()

    def upload(self) -> None:
        try:
            size = self.path.stat().st_size
            if size != self._size:
                self.store.put_file(self.key, self.path)
                self._size = size
        except Exception as exc:  # the next period tries again
            log.warning("could not upload the agent log: %s", exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.upload()


def _bounded(store: Store) -> Store:
    return store.bounded(EXIT_WRITE_SECONDS) if isinstance(store, GcsStore) else store


def group_url(
    project: str, group: str, *, zone: str | None, region: str | None, endpoint: str
) -> str:
    """The REST URL of a zonal (``zone``) or regional (``region``) managed instance group."""
    if zone:
        scope = f"zones/{zone}"
    elif region:
        scope = f"regions/{region}"
    else:
        raise ConfigError("leaving the group needs its --zone or --region (CFLOW_ZONE/REGION)")
    base = f"{endpoint.rstrip('/')}/compute/v1/projects/{project}"
    return f"{base}/{scope}/instanceGroupManagers/{group}"


def leave_group(
    *,
    project: str | None,
    group: str | None,
    zone: str | None,
    region: str | None,
    instance: str,
    instance_zone: str | None = None,
    sleep: Callable[[float], None] | None = None,
) -> bool:
    """Delete this worker's own VM from its managed instance group; True when accepted.

    ``deleteInstances`` (not a resize) removes exactly this instance and lowers the group's
    target size, so the group does not recreate it. The worker's service account holds a
    custom role allowing it (see infra/identity.py for its scope and why). Transient answers
    (5xx, rate limits into the next minute, 400 ``resourceNotReady`` when the group is busy with
    another operation, timeouts, reset connections) are retried by Compute's policy for up to
    :data:`LEAVE_GIVE_UP` seconds, every try with the same ``requestId`` so that a delete whose
    answer was lost is not repeated; any other refusal is final. The caller's backstop when
    this fails: :data:`EXIT_CANNOT_LEAVE`.

    Args:
        instance: this VM's name (the worker name on a VM).
        instance_zone: the VM's zone; needed for a regional group, defaults to ``zone``.
        sleep: how to wait between tries (injected by tests; its pauses count as time passed).
    """
    if not project or not group:
        log.warning("not leaving any group: project or group unknown")
        return False
    endpoint = os.environ.get(COMPUTE_ENDPOINT_ENV) or COMPUTE_ENDPOINT
    vm_zone = instance_zone or zone
    if not vm_zone:
        log.error("cannot leave group %s: this VM's zone is unknown (CFLOW_INSTANCE_ZONE)", group)
        return False
    url = group_url(project, group, zone=zone, region=region, endpoint=endpoint)
    body: dict[str, Any] = {
        "instances": [f"zones/{vm_zone}/instances/{instance}"],
        "skipInstancesOnValidationError": True,
    }
    try:
        session = _session(endpoint)
    except BackendError as exc:
        log.error("cannot leave group %s: %s", group, exc)
        return False
    target = f"{url}/deleteInstances?requestId={request_id()}"  # one id for every try

    def once() -> None:
        response = session.post(target, json=body, timeout=LEAVE_TIMEOUT)
        if not response.ok:
            raise HttpAnswer.of(response)

    try:
        retrying(
            COMPUTE,
            once,
            what=f"deleteInstances of VM {instance} in group {group}",
            clock=SYSTEM_CLOCK if sleep is None else _SleepClock(sleep),
            give_up_after=LEAVE_GIVE_UP,
        )
    except Exception as exc:
        log.error("could not leave group %s: %s", group, exc)
        return False
    log.info("left group %s: instance %s is being deleted", group, instance)
    return True


class _SleepClock:
    """The system clock waiting through an injected ``sleep`` whose pauses count as time
    passed, so the give-up bound holds when a test does not really wait."""

    def __init__(self, sleep: Callable[[float], None]):
        self._sleep = sleep
        self._slept = 0.0

    def time(self) -> float:
        return time.time() + self._slept

    def monotonic(self) -> float:
        return time.monotonic() + self._slept

    def sleep(self, seconds: float) -> None:
        self._sleep(seconds)
        self._slept += seconds


def _session(endpoint: str) -> AuthorizedSession:
    """An authorized HTTP session: ADC on a VM, none for an ``http://`` test endpoint."""
    if endpoint.startswith("http://"):
        return AuthorizedSession(AnonymousCredentials())
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/compute"])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise BackendError(f"no Google credentials to leave the group: {exc}") from None
    return AuthorizedSession(credentials)
