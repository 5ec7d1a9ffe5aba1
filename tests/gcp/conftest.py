"""Fixtures for the Google Cloud backends: emulators, fresh resources, the fake Compute API."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from infra.contract import DEFAULT_ACTION_ON_FAILURE
from runner.backends.gcp.events import RunSubscriptions
from tests import emulators
from tests.gcp.fake_compute import FakeCompute, Spawn
from tests.gcp.fault_proxies import FaultProxies
from tests.gcp.faults import FaultPlan
from worker.backends.base import Backends
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.pubsub import PubSubQueue

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def deployment() -> emulators.Deployment:
    """Fresh topics, subscriptions and bucket on the emulators (started on first use)."""
    return emulators.new_deployment()


@pytest.fixture
def gcp_backends(deployment: emulators.Deployment) -> Iterator[Backends]:
    backends = emulators.open_backends(deployment)
    try:
        yield backends
    finally:
        backends.close()


MakeCompute = Callable[..., FakeCompute]
MakeProxies = Callable[[FaultPlan], FaultProxies]


@pytest.fixture
def fault_proxies(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeProxies]:
    """Start fault proxies in front of the emulators (``make(plan)``); this process's clients
    go through them, and ``proxies.env`` sends other processes the same way."""
    started: list[FaultProxies] = []

    def make(plan: FaultPlan) -> FaultProxies:
        running = emulators.emulators()
        proxies = FaultProxies(running.gcs_url, running.pubsub_host, plan)
        started.append(proxies)
        for name, value in proxies.env.items():
            monkeypatch.setenv(name, value)
        return proxies

    yield make
    for proxies in started:
        proxies.stop()


@pytest.fixture
def fake_compute(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeCompute]:
    """Start fake Compute APIs (``make(spawn=..., group=...)``); the last one is the endpoint."""
    started: list[FakeCompute] = []

    def make(*, spawn: Spawn, group: str = "cflow-workers", **kwargs: Any) -> FakeCompute:
        # The deployment's group does what the stack declares with a VM that stopped itself.
        kwargs.setdefault("default_action_on_failure", DEFAULT_ACTION_ON_FAILURE)
        fake = FakeCompute(project=emulators.PROJECT, group=group, spawn=spawn, **kwargs).start()
        monkeypatch.setenv("CFLOW_COMPUTE_ENDPOINT", fake.endpoint)
        started.append(fake)
        return fake

    yield make
    for fake in started:
        fake.stop()


def worker_env(endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a worker process on the emulators and the fake Compute API."""
    env = {**os.environ, **emulators.emulators().env, "CFLOW_COMPUTE_ENDPOINT": endpoint}
    for name in ("CFLOW_STORE", "CFLOW_DEPLOYMENT", "CFLOW_BACKEND"):
        env.pop(name, None)
    env.update({"PYTHONPATH": str(REPO), "CFLOW_LOG_LEVEL": "INFO", **extra})
    return env


def worker_spawner(
    d: emulators.Deployment,
    *,
    logs: Path,
    group: str,
    zone: str,
    endpoint: Callable[[], str],
    idle_timeout: float = 60.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Spawn:
    """``spawn(name)`` for a fake group: a real ``python -m worker --backend gcp`` process."""
    shaped = shaped_worker_spawner(
        d,
        logs=logs,
        zone=zone,
        endpoint=endpoint,
        idle_timeout=idle_timeout,
        extra_args=extra_args,
        env=env,
    )
    metadata = {
        "cflow-group": group,
        "cflow-subscription": d.work_subscription,
        "cflow-work-topic": d.work_topic,
    }

    def spawn(name: str) -> subprocess.Popen[Any]:
        return shaped(name, metadata)

    return spawn


def shaped_worker_spawner(
    d: emulators.Deployment,
    *,
    logs: Path,
    endpoint: Callable[[], str],
    zone: str | None = None,
    region: str | None = None,
    idle_timeout: float = 60.0,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Callable[[str, dict[str, str]], subprocess.Popen[Any]]:
    """``shaped_spawn(name, metadata)`` for a fake's groups: a real worker configured from the
    instance metadata of its group's template, as infra/scripts/startup.sh configures it (the
    group to leave, the subscription to pull, the topic to re-queue on)."""
    logs.mkdir(parents=True, exist_ok=True)
    vm_zone = f"{region}-b"  # the fake's regional VMs' zone
    where = ("--zone", zone) if zone else ("--region", str(region), "--instance-zone", vm_zone)

    def spawn(name: str, metadata: dict[str, str]) -> subprocess.Popen[Any]:
        with (logs / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [
                    *(sys.executable, "-m", "worker", "--backend", "gcp"),
                    *("--project", d.project, "--bucket", d.bucket),
                    *("--subscription", metadata["cflow-subscription"]),
                    *("--work-topic", metadata["cflow-work-topic"]),
                    *("--events-topic", d.events_topic),
                    *("--group", metadata["cflow-group"], *where),
                    *("--name", name, "--idle-timeout", str(idle_timeout)),
                    *("--scratch", str(logs / "scratch" / name)),
                    *extra_args,
                ],
                # The task inherits the worker's environment: it can tell who runs it.
                env=worker_env(endpoint(), CFLOW_WORKER_NAME=name, **(env or {})),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    return spawn


class ShortClock:
    """The real clock for a runner's Compute calls, except that each pause asked for is
    recorded and waited at most ``most`` seconds for real; the rest counts as time passed on
    this clock. A rate limit's wait into the next minute then takes a blink, and a test can
    still read where it would have resumed: ``pauses`` holds ``(when asked, seconds)``."""

    def __init__(self, most: float = 0.2) -> None:
        self.most = most
        self.pauses: list[tuple[float, float]] = []
        self._skipped = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        return time.time() + self._skipped

    def monotonic(self) -> float:
        return time.monotonic() + self._skipped

    def sleep(self, seconds: float) -> None:
        self.pauses.append((self.time(), seconds))
        real = min(max(seconds, 0.0), self.most)
        time.sleep(real)
        with self._lock:
            self._skipped += max(seconds, 0.0) - real


@dataclass
class RunParts:
    """What an in-process runner watches a run on the emulators with."""

    store: GcsStore
    queue: PubSubQueue
    subscriber: Any
    per_run: RunSubscriptions


def run_parts(deployment: emulators.Deployment) -> RunParts:
    """The store, the work queue and the per-run event subscriptions of ``deployment``."""
    import google.cloud.pubsub_v1 as pubsub_v1

    store = GcsStore(deployment.bucket)
    subscriber = pubsub_v1.SubscriberClient()
    per_run = RunSubscriptions(
        project=deployment.project,
        events_topic=deployment.events_topic,
        events_subscription=deployment.events_subscription,
        store=store,
        subscriber=subscriber,
    )
    queue = PubSubQueue(project=deployment.project, topic=deployment.work_topic)
    return RunParts(store, queue, subscriber, per_run)
