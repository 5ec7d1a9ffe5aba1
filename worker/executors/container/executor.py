"""Runs task attempts inside a container image (see :mod:`worker.executors.container.runtime`).

A ``task.py`` runs in a warm container per worker slot (:mod:`worker.executors.container.warm`),
shard after shard. A ``task.sh``, a ``task.py`` with ``--isolate`` (or whose ``task.py`` does not
import, so each attempt's log shows why) and a shard whose folders a warm container cannot
mount get one container per attempt, removed when it ends::

    /task              the unpacked task bundle              read-only
    /opt/cflow/worker  the worker's task host (stdlib only)  read-only, on PYTHONPATH
    /cflow/input/NAME  the shard's staged input file         read-only
    /cflow/out         the attempt's output folder           read-write

Everything else is the image, mounted read-only (with a private ``/tmp``), so a task can write
nowhere but its output folder. ``task.py`` runs with the image's ``python3`` through
``python -m worker.executors.zygote --once /task``; ``task.sh`` with the image's bash, else its sh.
The ``CFLOW_*`` variables carry the paths as the task sees them. A small init is PID 1 (when the
engine has one), so SIGTERM reaches the task; when the attempt ends every process in the
container goes with it. A worker that dies cannot clean up: podman kills its container
a minute past the attempt's timeout, and the next worker process on the host removes any
container whose worker is gone (:func:`reap_orphans`, docker too).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import threading
from pathlib import Path

from worker.bundle import SHELL_ENTRY, UnpackedBundle
from worker.executors.base import RunningTask, TaskExecutor, fresh_cwd, task_cwd, wait_process
from worker.executors.container.gpus import GpuSupportMissing, check_gpu_support
from worker.executors.container.runtime import (
    ContainerRuntimeMissing,
    ImagePullError,
    Runtime,
    detect_runtime,
    ensure_image,
)
from worker.executors.container.spec import (
    OWNER_LABEL,
    TASK_DIR,
    WORK_DIR,
    ContainerSpec,
    safe_name,
)
from worker.executors.container.warm import WarmContainers
from worker.protocol import Entry, slug
from worker.taskapi import TaskShard
from worker.tempdirs import pid_alive

__all__ = ["ContainerExecutor", "ContainerRuntimeMissing", "GpuSupportMissing", "ImagePullError"]

INPUT_DIR = "/cflow/input"
OUTPUT_DIR = "/cflow/out"
BACKSTOP_SECONDS = 60.0  # podman kills a container this long after the attempt's timeout


class ContainerExecutor(TaskExecutor):
    """Starts attempts of one unpacked bundle in containers of ``image``.

    A :class:`~worker.executors.base.TaskExecutor`, as :class:`worker.executors.process.Executor`
    is; the containers are made as its :attr:`spec` says. A ``task.py`` runs in a warm container
    per slot
    (:mod:`worker.executors.container.warm`) unless ``isolate``; a ``task.sh``, an isolated
    ``task.py`` and a shard whose folders a warm container cannot mount get a container per attempt.

    Args:
        bundle: the unpacked task.
        entry: how it runs (``task.py`` or ``task.sh``).
        image: the image reference (pulled here once if it is missing).
        runtime: the engine (default: :func:`detect_runtime`).
        timeout: the run's attempt timeout in seconds; podman kills a per-attempt container
            left running ``backstop`` seconds past it (default :data:`BACKSTOP_SECONDS`) even
            if this worker died.
        network: the container network (default ``host``: the task reaches what the worker
            reaches, such as the metadata server, without a network namespace per attempt).
        isolate: a container per attempt for ``task.py`` too (``--isolate``).
        gpu: give the containers every NVIDIA GPU of the machine.

    Raises:
        ContainerRuntimeMissing, ImagePullError, GpuSupportMissing: from construction, once
            per worker and image.
    """

    def __init__(
        self,
        bundle: UnpackedBundle,
        entry: Entry,
        image: str,
        *,
        runtime: Runtime | None = None,
        timeout: float | None = None,
        backstop: float = BACKSTOP_SECONDS,
        network: str = "host",
        isolate: bool = False,
        gpu: bool = False,
    ):
        self.bundle = bundle
        self.entry = entry
        self.spec = ContainerSpec(bundle, image, runtime or detect_runtime(), network, gpu)
        self.timeout = timeout
        self.backstop = backstop
        self._live: set[str] = set()
        self._lock = threading.Lock()
        if gpu:
            check_gpu_support(self.spec.runtime)
        ensure_image(self.spec.runtime, image)
        reap_orphans(self.spec.runtime)
        warm = entry is Entry.PYTHON and not isolate
        self._warm = WarmContainers(self.spec) if warm else None

    @property
    def queues(self) -> bool:
        """Never: a slot's next shard starts once this one's outputs are sealed. A warm
        container sees the whole slot folder, so a shard queued behind another could otherwise
        rewrite that one's outputs between its end and their sealing."""
        return False

    def command(self, shard: TaskShard, name: str) -> list[str]:
        """The engine command line that runs one attempt as container ``name``."""
        mounts = [(shard.output_dir, OUTPUT_DIR, "rw"), (task_cwd(shard), WORK_DIR, "rw")]
        inner_input = shard.input
        local_input = shard.input_path
        if local_input is not None:
            inner_input = f"{INPUT_DIR}/{safe_name(local_input.name)}"
            mounts.append((local_input.resolve(), inner_input, "ro"))
        env = {**shard.env(), "CFLOW_INPUT": inner_input or "", "CFLOW_OUTPUT_DIR": OUTPUT_DIR}
        labels = {
            "cflow.run": shard.run_id,
            "cflow.shard": shard.id,
            "cflow.attempt": str(shard.attempt),
        }
        lifetime = None if self.timeout is None else self.timeout + self.backstop
        argv = self.spec.run_args(name, labels, mounts, env, lifetime=lifetime, workdir=WORK_DIR)
        if self.entry is Entry.SHELL:
            script = f"{TASK_DIR}/{SHELL_ENTRY}"
            argv += [
                "/bin/sh",
                "-c",
                f"command -v bash >/dev/null 2>&1 && exec bash {script}; exec sh {script}",
            ]
        else:
            argv += ["python3", "-m", "worker.executors.zygote", "--once", TASK_DIR]
        return argv

    def start(self, shard: TaskShard, log_path: Path, *, slot: int = 0) -> RunningTask:
        """Start one attempt; ``log_path``'s folder must exist. Creates the output folder.
        A ``task.py`` goes to ``slot``'s warm container; otherwise the attempt gets a
        container of its own."""
        shard.output_dir.mkdir(parents=True, exist_ok=True)
        fresh_cwd(shard)
        if self._warm is not None:
            task = self._warm.start(shard, log_path, slot)
            if task is not None:
                return task
        name = _container_name(shard)
        argv = self.command(shard, name)
        with self._lock:
            self._live.add(name)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                env=self.spec.runtime.environ(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return _ContainerTask(proc, name, self)

    def _forget(self, name: str) -> None:
        with self._lock:
            self._live.discard(name)

    def begin_close(self) -> None:
        """Tell the warm containers to end; :meth:`close` waits for them."""
        if self._warm is not None:
            self._warm.begin_close()

    def close(self) -> None:
        """End the warm containers and remove any container of this executor still there."""
        if self._warm is not None:
            self._warm.close()
        with self._lock:
            names, self._live = sorted(self._live), set()
        for name in names:
            self.spec.runtime.remove(name)


class _ContainerTask(RunningTask):
    """One attempt's container, seen through its attached ``run`` client process."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str, owner: ContainerExecutor):
        self._proc = proc
        self.pid = proc.pid
        self.name = name
        self._owner = owner
        self._stopped = False

    def wait(self, timeout: float | None) -> int | None:
        code = wait_process(self._proc, timeout)
        if code is None:
            return None
        self._owner._forget(self.name)
        # The engine reports a signal death as 128+N, like a shell; the agent expects -N.
        if self._stopped and code > 128:
            return -(code - 128)
        return code

    def signal(self, sig: int) -> None:
        self._owner.spec.runtime.call("kill", "--signal", str(int(sig)), self.name)

    def stop(self, grace: float) -> int | None:
        """SIGTERM the task, SIGKILL it after ``grace`` seconds, and remove the container."""
        self._stopped = True
        self.signal(signal.SIGTERM)
        code = self.wait(grace)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(10.0)
        if code is None:  # the client hangs (or the container was never made): end both
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            code = self.wait(10.0)
        # The client is gone, so nothing creates the container after this removal.
        self._owner.spec.runtime.remove(self.name)
        self._owner._forget(self.name)
        return code


def _container_name(shard: TaskShard) -> str:
    shard_part = slug(shard.id, 40) or "shard"
    return f"cflow-{slug(shard.run_id, 40)}-{shard_part}-{shard.attempt}-{secrets.token_hex(3)}"


_reaped: set[str] = set()
_reap_lock = threading.Lock()


def reap_orphans(runtime: Runtime) -> list[str]:
    """Remove containers that a dead worker process on this host left running (a SIGKILLed
    worker cannot clean up; docker has no ``--timeout`` to end them). Once per process and
    engine; returns the names removed."""
    with _reap_lock:
        if runtime.binary in _reaped:
            return []
        _reaped.add(runtime.binary)
    host = socket.gethostname()
    listed = runtime.call("ps", "--all", "--quiet", "--filter", f"label={OWNER_LABEL}")
    ids = listed.stdout.split()
    if listed.returncode != 0 or not ids:
        return []
    template = '{{.Name}} {{index .Config.Labels "' + OWNER_LABEL + '"}}'
    inspected = runtime.call("inspect", "--format", template, *ids)
    removed = []
    for line in inspected.stdout.splitlines():
        name, _, owner = line.strip().lstrip("/").partition(" ")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        runtime.remove(name)
        removed.append(name)
    return removed
