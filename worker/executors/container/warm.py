"""A warm container per worker slot for a ``task.py`` run with ``--image``.

Each slot keeps one long-lived container of the image running the task host
(:mod:`worker.executors.host`, standard library only) with the image's ``python3``: ``task.py`` is
imported once, then shard after shard is sent down the container's stdin and answered on its
stdout, as with the host outside a container. Starting a container costs 0.15-0.3 s; a shard
sent to a warm one about a millisecond. Unlike outside, the agent sends a slot's next shard
only once the last one's outputs are sealed (:attr:`ContainerExecutor.queues` is False): the
container sees the whole slot folder, so a shard queued behind another could otherwise rewrite
that one's outputs in the moment between its end and their sealing. Shards sent together
(:meth:`WarmContainers.start` allows it) still run one after another.

What the container sees, at the same path inside as outside (so the requests, the ``CFLOW_*``
variables and the logs name the same paths on both sides):

- the folders of the shard's log and output folder (the slot's scratch folder), read-write;
- the folder of a local input file, read-only;
- ``/task`` and ``/opt/cflow/worker`` read-only, a private ``/tmp``, the rest of the image
  read-only, as for a container per attempt (:mod:`worker.executors.container.executor`).

A container is started with the folders its first shard needs; a later shard that needs
another folder gets a fresh container that mounts both (up to :data:`MAX_MOUNTS`), or, while
the warm one still has shards queued, a container of its own. A shard whose folders cannot be
mounted at their own path (``:`` or ``,`` in it, or a system folder such as ``/tmp`` itself)
also gets a container of its own.

The attempt promises: after each shard the host kills every process the shard started (it is
a child subreaper inside the container). A timeout, a preemption or a cancel stops the whole
container (SIGTERM through its init, SIGKILL after the grace period); a crash or ``os._exit``
ends it too; either way only that attempt fails, shards queued behind it are sent again, and
the next shard gets a fresh container. When the worker exits its containers end with it, and
when it dies (even by SIGKILL) the host sees its requests' pipe hang up and ends its container
at once (``worker.executors.host --hangup``); ``--rm`` removes it, and the next worker on the
machine removes any container a dead worker left
(:func:`worker.executors.container.executor.reap_orphans`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import threading
from pathlib import Path

from worker.executors import reaper
from worker.executors.base import PROCESSES, task_cwd
from worker.executors.container.runtime import Runtime
from worker.executors.container.spec import LIB_DIR, TASK_DIR, ContainerSpec
from worker.executors.host_client import Host, HostTask
from worker.protocol import slug
from worker.taskapi import TaskShard

log = logging.getLogger(__name__)

MAX_MOUNTS = 16  # folders one warm container mounts before a fresh one starts with fewer
Mount = tuple[Path, str]  # a folder, mounted at its own path: "ro" or "rw"

# Folders a shard's folder may not be mounted at (the image's own or the engine's), and those
# it may not be mounted inside of (the image's system, CFlow's own mount points).
_NOT_AT = frozenset(
    {
        *("/", "/bin", "/boot", "/etc", "/home", "/lib", "/lib32", "/lib64", "/libx32"),
        *("/media", "/mnt", "/opt", "/root", "/run", "/sbin", "/srv", "/tmp", "/var"),
    }
)
_NOT_IN = tuple(Path(p) for p in ("/proc", "/sys", "/dev", "/usr", TASK_DIR, LIB_DIR))


def _mountable(folder: Path) -> bool:
    text = str(folder)
    if ":" in text or "," in text or text in _NOT_AT:
        return False
    return not any(folder == p or p in folder.parents for p in _NOT_IN)


def _within(folder: Path, mount: Path) -> bool:
    return folder == mount or mount in folder.parents


def needs(shard: TaskShard, log_path: Path) -> list[Mount] | None:
    """The folders a warm container must mount for this shard: its log's and its output
    folder's parents read-write, a local input's folder read-only; None when one of them
    cannot be mounted at its own path."""
    writable = {Path(os.path.abspath(log_path)).parent}
    writable.add(Path(os.path.abspath(shard.output_dir)).parent)
    readable = set()
    if shard.input_path is not None:
        readable.add(Path(os.path.abspath(shard.input_path)).parent)
        readable.add(Path(os.path.realpath(shard.input_path)).parent)  # a link's target, too
    wanted = [(f, "rw") for f in sorted(writable)] + [(f, "ro") for f in sorted(readable)]
    if not all(_mountable(folder) for folder, _ in wanted):
        return None
    return merge([], wanted)


def covers(mounts: list[Mount], wanted: list[Mount]) -> bool:
    """Whether a container with ``mounts`` sees every folder ``wanted``, as it must."""
    return all(
        any(_within(folder, m) and (mode == "ro" or m_mode == "rw") for m, m_mode in mounts)
        for folder, mode in wanted
    )


def merge(mounts: list[Mount], wanted: list[Mount]) -> list[Mount]:
    """``mounts`` plus what of ``wanted`` they do not cover, without folders that another one
    already covers."""
    result = list(mounts)
    for item in wanted:
        if not covers(result, [item]):
            result.append(item)
    return [m for m in result if not covers([o for o in result if o != m], [m])]


class ContainerHost(Host):
    """A task host inside container ``name``, seen through the engine's attached client."""

    def __init__(
        self, proc: subprocess.Popen[bytes], runtime: Runtime, name: str, mounts: list[Mount]
    ):
        self.runtime = runtime
        self.name = name
        self.mounts = mounts
        self.removed = False  # the container was removed (when its client ended)
        super().__init__(proc)

    def exit_code(self, code: int) -> int:
        # The engine reports a signal death as 128+N, like a shell; the agent expects -N.
        if self.stopped and code > 128:
            return -(code - 128)
        return super().exit_code(code)

    def _died(self) -> None:
        super()._died()
        self.runtime.remove(self.name)  # the client is gone: nothing makes it again
        self.removed = True

    def close(self) -> None:
        super().close()  # the host sees its requests hang up and ends the container
        if not self.removed:  # closing reads the host to its end, which removes it already
            self.runtime.remove(self.name)
            self.removed = True


class ContainerHostTask(HostTask):
    """One shard sent to a warm container; stopping it ends the container."""

    _host: ContainerHost

    def signal(self, sig: int) -> None:
        self._host.runtime.call("kill", "--signal", str(int(sig)), self._host.name)

    def stop(self, grace: float) -> int | None:
        """SIGTERM the container's host, SIGKILL it after ``grace`` seconds; the exit code.
        The container goes with it (and the shards queued on it are sent again)."""
        host = self._host
        host.stopped = True
        self.signal(signal.SIGTERM)
        code = self.wait(grace)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(10.0)
        if code is None:  # the client hangs: end it, and with it the host's requests
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(host.proc.pid, signal.SIGKILL)
            code = self.wait(10.0)
        if host.dead_code is None:
            host.stopped = False  # the task handled SIGTERM and returned: the host lives on
        return code


class WarmContainers:
    """The warm containers of one :class:`~worker.executors.container.executor.ContainerExecutor`,
    one per slot, made as ``spec`` says."""

    def __init__(self, spec: ContainerSpec):
        self._spec = spec
        self._hosts: dict[int, ContainerHost] = {}
        self._lock = threading.Lock()
        self.cold = False  # the task does not import (or no host starts): one per attempt

    def start(self, shard: TaskShard, log_path: Path, slot: int) -> HostTask | None:
        """Send the shard to ``slot``'s warm container; None when it needs one of its own."""
        wanted = needs(shard, log_path)
        if wanted is None:
            return None
        host = self._host(slot, wanted, shard)
        if host is None:
            return None
        token = secrets.token_hex(8)
        env = shard.env()
        if shard.input_path is not None:
            env["CFLOW_INPUT"] = os.path.abspath(shard.input_path)
        env["CFLOW_OUTPUT_DIR"] = os.path.abspath(shard.output_dir)
        env[reaper.TOKEN_VAR] = token
        PROCESSES.begin(token)
        request_id = host.requests
        host.requests += 1
        cwd = os.path.abspath(task_cwd(shard))  # beside the output folder: mounted with it
        request = {"id": request_id, "log": os.path.abspath(log_path), "cwd": cwd}
        request["env"] = env
        if not host.send(request):
            host.recycle = True
        return ContainerHostTask(host, request_id, token, log_path)

    def _host(self, slot: int, wanted: list[Mount], shard: TaskShard) -> ContainerHost | None:
        with self._lock:
            if self.cold:
                return None
            host = self._hosts.get(slot)
            if host is not None and host.alive and covers(host.mounts, wanted):
                return host
            if host is not None and host.alive and host.outstanding:
                return None  # shards are queued on it: this one runs beside it
            mounts = wanted
            if host is not None:
                host.close()
                del self._hosts[slot]
                if host.ready is False:  # the task would not load in it (Host says when)
                    log.warning(
                        "no warm container of %s (%s): a container per attempt shows why",
                        self._spec.image,
                        host.error or "its host did not start",
                    )
                    self.cold = True
                    return None
                mounts = merge(host.mounts, wanted)
                if len(mounts) > MAX_MOUNTS:
                    mounts = wanted
            host = self._hosts[slot] = self._spawn(slot, mounts, shard)
            return host

    def _spawn(self, slot: int, mounts: list[Mount], shard: TaskShard) -> ContainerHost:
        spec = self._spec
        name = f"cflow-warm-{slug(shard.run_id, 40)}-{slot}-{secrets.token_hex(3)}"
        labels = {"cflow.run": shard.run_id, "cflow.slot": str(slot), "cflow.warm": "1"}
        volumes = [(folder, str(folder), mode) for folder, mode in mounts]
        argv = spec.run_args(name, labels, volumes, {}, interactive=True)
        argv += ["python3", "-m", "worker.executors.host", "--hangup", TASK_DIR]
        proc = subprocess.Popen(
            argv,
            env=spec.runtime.environ(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        return ContainerHost(proc, spec.runtime, name, mounts)

    def begin_close(self) -> None:
        """Tell every warm container's host to exit; :meth:`close` waits for them."""
        with self._lock:
            hosts = list(self._hosts.values())
        for host in hosts:
            host.begin_close()

    def close(self) -> None:
        self.begin_close()  # every container winds down at once, then each is waited for
        with self._lock:
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()
