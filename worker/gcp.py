"""The worker's Google Cloud backends, and how an idle worker leaves its instance group.

``open_gcp`` wires Pub/Sub and Cloud Storage from plain settings (flags or ``CFLOW_*``
variables, which the VM bootstrap fills from instance metadata). The clients honour
``PUBSUB_EMULATOR_HOST`` and ``STORAGE_EMULATOR_HOST``; ``CFLOW_COMPUTE_ENDPOINT`` points the
Compute Engine calls elsewhere (an ``http://`` endpoint is a test fake and gets no credentials).
Credentials are Application Default Credentials: the VM's service account, never a key file.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import google.auth
import google.auth.exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.transport.requests import AuthorizedSession

from worker import defaults
from worker.backends import Backends
from worker.errors import BackendError, ConfigError
from worker.gcs_store import GcsStore, make_client
from worker.pubsub_queue import PubSubEvents, PubSubQueue

log = logging.getLogger("cflow.worker")

COMPUTE_ENDPOINT = "https://compute.googleapis.com"
COMPUTE_ENDPOINT_ENV = "CFLOW_COMPUTE_ENDPOINT"
LEAVE_ATTEMPTS = 4  # tries of the self-delete request before giving up
LEAVE_TIMEOUT = 30.0  # seconds per self-delete request


def _require(**settings: str | None) -> None:
    missing = [name for name, value in settings.items() if not value]
    if missing:
        flags = ", ".join(
            f"--{n.replace('_', '-')} (CFLOW_{n.upper()})"
            for n in missing  # the flag and variable names of worker/cli.py
        )
        raise ConfigError(f"the gcp backend needs {flags}")


def open_gcp(
    *,
    project: str | None,
    bucket: str | None,
    subscription: str | None,
    events_topic: str | None,
    slots: int = defaults.SLOTS,
    max_lease_seconds: float | None = None,
    work_topic: str | None = None,
    lease_seconds: float = defaults.LEASE_SECONDS,
) -> Backends:
    """The worker's queue (the work subscription), store (the bucket) and event publisher.

    Args:
        project: project of bare topic and subscription names.
        bucket: the deployment's bucket (bare name).
        subscription: the work subscription to pull from.
        events_topic: where progress events go.
        slots: shards run at once; sizes the HTTP connection pool.
        max_lease_seconds: how long a held message is renewed without agent heartbeats.
        work_topic: where a failed shard is re-queued; looked up from the subscription if absent.
        lease_seconds: the ack deadline kept on held messages (a dead worker's shards come
            back after at most this long).

    Raises:
        ConfigError: a required setting is missing.
    """
    _require(project=project, bucket=bucket, subscription=subscription, events_topic=events_topic)
    assert project and bucket and subscription and events_topic
    store = GcsStore(bucket, client=make_client(project, pool_size=max(slots * 3, 10)))
    queue = PubSubQueue(
        project=project,
        topic=work_topic,
        subscription=subscription,
        lease_seconds=lease_seconds,
        max_lease_seconds=max_lease_seconds,
    )
    events = PubSubEvents(project=project, topic=events_topic)
    return Backends(queue=queue, store=store, events=events)


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
) -> bool:
    """Delete this worker's own VM from its managed instance group; True when accepted.

    ``deleteInstances`` (not a resize) removes exactly this instance and lowers the group's
    target size, so the group does not recreate it. The worker's service account holds a
    custom role allowing just that, on just this group.

    Args:
        instance: this VM's name (the worker name on a VM).
        instance_zone: the VM's zone; needed for a regional group, defaults to ``zone``.
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
    for attempt in range(1, LEAVE_ATTEMPTS + 1):
        try:
            response = session.post(f"{url}/deleteInstances", json=body, timeout=LEAVE_TIMEOUT)
        except Exception as exc:  # network trouble: try again
            log.warning("leaving group %s failed (try %d): %s", group, attempt, exc)
        else:
            if response.ok:
                log.info("left group %s: instance %s is being deleted", group, instance)
                return True
            log.warning(
                "leaving group %s failed (try %d): HTTP %d %s",
                group,
                attempt,
                response.status_code,
                response.text[:300],
            )
            if response.status_code < 500 and response.status_code != 429:
                return False
        time.sleep(min(2.0**attempt, 10.0))
    return False


def _session(endpoint: str) -> AuthorizedSession:
    """An authorized HTTP session: ADC on a VM, none for an ``http://`` test endpoint."""
    if endpoint.startswith("http://"):
        return AuthorizedSession(AnonymousCredentials())
    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/compute"])
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise BackendError(f"no Google credentials to leave the group: {exc}") from None
    return AuthorizedSession(credentials)
