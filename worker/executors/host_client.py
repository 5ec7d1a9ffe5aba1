"""The worker's side of a warm task host (:mod:`worker.executors.host`): starting one, spare
interpreters started ahead, and the shards sent to it.

A host is started per worker slot and runs shard after shard of one bundle; :class:`Host` talks
to it on its pipes (one JSON line a request, one a reply), and :class:`HostTask` is one shard
sent to it. ``SPARE_HOSTS`` starts interpreters while the worker waits for work, so the first
shard of a slot does not pay for Python's start: a spare is told its task on its first line.

A local worker (``worker.cli`` calls :func:`fork_hosts`) forks its hosts from itself instead,
while it has one thread: it has what a host imports loaded already, and a fork is ready in a few
milliseconds where a new interpreter takes a tenth of a second of CPU. A forked host is this
worker's child as a spawned one is (it dies with the worker, its exit status is the worker's to
read), behind the same face (:class:`HostProcess`). A worker on a VM starts interpreters: its
cloud clients' threads are running by then.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Protocol

from worker.bundle import UnpackedBundle
from worker.executors import host as host_process
from worker.executors import reaper
from worker.executors.base import (
    PROCESSES,
    WORKER_PATH,
    RunningTask,
)
from worker.executors.zygote import EXITED_0


class HostProcess(Protocol):
    """A task host's process as its :class:`Host` sees it: a ``subprocess.Popen`` (spawned)
    or a :class:`ForkedHost`."""

    pid: int
    returncode: int | Any
    stdin: IO[bytes] | None
    stdout: IO[bytes] | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class ForkedHost:
    """A task host forked from this worker (:func:`worker.executors.host.run_forked`): its
    pipes and exit status as a ``subprocess.Popen`` gives them."""

    def __init__(self, pid: int, stdin: IO[bytes], stdout: IO[bytes]):
        self.pid = pid
        self.stdin: IO[bytes] | None = stdin
        self.stdout: IO[bytes] | None = stdout
        self.returncode: int | None = None
        self._lock = threading.Lock()  # one waitpid at a time, as Popen's

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: its status is lost, as Popen says
                    pid, status = self.pid, 0
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Its exit status once it ended (negative: the signal that ended it).

        Raises:
            subprocess.TimeoutExpired: it still runs after ``timeout`` seconds.
        """
        if timeout is not None and self.poll() is None:
            with contextlib.suppress(OSError):  # gone already
                fd = os.pidfd_open(self.pid)
                try:
                    select.select([fd], [], [], timeout)
                finally:
                    os.close(fd)
        code = self.poll()
        if code is not None:
            return code
        if timeout is not None:
            raise subprocess.TimeoutExpired(f"task host {self.pid}", timeout)
        with self._lock:
            if self.returncode is None:
                try:
                    self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                except ChildProcessError:
                    self.returncode = 0
            return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


_forking = False  # this worker forks its hosts (see fork_hosts)


def fork_hosts() -> None:
    """From now on fork this process's task hosts from it while it has one thread, instead of
    starting new interpreters: for a local worker, which has loaded what a host imports (never
    for one that holds cloud clients' threads and state)."""
    global _forking
    _forking = True


def _one_thread() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class _Spares:
    """Task hosts started before the worker knows its task: a Python interpreter's start is
    most of the wait for a run's first shard, and it can happen while the worker waits."""

    def __init__(self) -> None:
        self._procs: list[HostProcess] = []
        self._lock = threading.Lock()
        # The worker's log, where spares forked before the worker had one (a launcher's worker
        # forked ahead) write their own errors once told their task.
        self.log: str | None = None
        # Installed modules a spare imports while it waits (a launcher's, for the function its
        # caller last mapped: worker.executors.host.preload).
        self.preload: list[str] = []

    def forget_all(self) -> None:
        """In a child just forked: the spares are its parent's (a task host is forked inside
        the lock). What to preload and where to log stay."""
        self._procs = []
        self._lock = threading.Lock()

    def start(self, count: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (WORKER_PATH, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        with self._lock:
            args = [f"--preload={','.join(self.preload)}"] if self.preload else []
            while len(self._procs) < count:
                self._procs.append(_spawn_host([*args, "--spare"], env, None))

    def take(self) -> HostProcess | None:
        with self._lock:
            while self._procs:
                proc = self._procs.pop()
                if proc.poll() is None:
                    return proc
            return None

    def begin_close(self) -> None:
        """Tell every spare to exit (its input ends); :meth:`close` waits for them."""
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()  # a spare that was never given a task exits at once

    def close(self) -> None:
        self.begin_close()  # all told first, so they exit side by side
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            PROCESSES.forget(proc.pid)


def _spawn_host(args: list[str], env: dict[str, str], cwd: Path | None) -> HostProcess:
    """``python -m worker.executors.host ARGS``: forked from this worker where it may
    (:func:`fork_hosts`), else a new interpreter."""
    if _forking and _one_thread():
        return _fork_host(args, env, cwd)
    return PROCESSES.spawn(
        [sys.executable, "-m", "worker.executors.host", *args],
        None,
        cwd=cwd,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )


def _fork_host(args: list[str], env: dict[str, str], cwd: Path | None) -> ForkedHost:
    requests, to_host = os.pipe()
    from_host, replies = os.pipe()
    for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
        with contextlib.suppress(Exception):
            stream.flush()
    with PROCESSES.lock:  # registered before any orphan sweep can see it
        try:
            pid = os.fork()
        except OSError:  # no process to be had: said as a failed spawn would say it
            for fd in (requests, to_host, from_host, replies):
                os.close(fd)
            raise
        if pid == 0:  # pragma: no cover - the host's own process
            # Forked inside both locks: a function that maps (cflow.map) forks from here.
            PROCESSES.forget_all()
            SPARE_HOSTS.forget_all()
            host_process.run_forked(args, env, cwd, requests, replies)
        PROCESSES.known.add(pid)
    os.close(requests)
    os.close(replies)
    return ForkedHost(pid, os.fdopen(to_host, "wb"), os.fdopen(from_host, "rb"))


SPARE_HOSTS = _Spares()


def start_host(bundle: UnpackedBundle, env: dict[str, str]) -> HostProcess:
    """A host process for ``bundle``: a spare told its task, else a new one."""
    spare = SPARE_HOSTS.take()
    if spare is not None:
        load: dict[str, Any] = {
            "task": str(bundle.root),
            "path": bundle.python_path().split(os.pathsep),
            "env": env,
        }
        if isinstance(spare, ForkedHost):  # as a host forked now would have it
            load["sys_path"] = list(sys.path)
            if SPARE_HOSTS.log is not None:
                load["stderr"] = SPARE_HOSTS.log
        assert spare.stdin is not None
        try:
            spare.stdin.write(json.dumps(load).encode() + b"\n")
            spare.stdin.flush()
            return spare
        except OSError:
            pass
    return _spawn_host([str(bundle.root)], env, bundle.root)


class Host:
    """A warm task host process (see :mod:`worker.executors.host`) owned by one slot, talking on the
    pipes of ``proc`` (the host itself, or the engine client of a warm container).

    Its first line says whether the task loaded (``ready``: None until it came). It is not
    waited for here: the first shard is sent at once and waited for as an attempt is, so a
    ``task.py`` whose import hangs is timed out, cancelled or preempted with that shard. A
    host whose task would not load (or that ended before saying) leaves the shards sent to it
    not started (:attr:`HostTask.not_started`): they are run again, in a process of their own
    that shows why (the executor's cold path)."""

    def __init__(self, proc: HostProcess):
        self.proc = proc
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin: IO[bytes] = self.proc.stdin
        self._stdout: IO[bytes] = self.proc.stdout
        self.requests = 0
        self.recycle = False
        self.outstanding: list[int] = []  # request ids sent and not yet answered, in order
        self.replies: dict[int, dict[str, Any]] = {}
        self.dead_code: int | None = None  # what a shard it died under reports (never 0)
        self.exit_status: int | None = None  # the host's own exit status, once it died
        self.died_under: int | None = None  # the request it was running then
        self.ready: bool | None = None  # whether its task loaded (None: not said yet)
        self.error: str | None = None  # why it did not, as it said
        self.stopped = False  # we ended it (a timeout, a preemption, a cancel)
        self._fd = self._stdout.fileno()
        self._buffer = b""  # replies are read unbuffered: select() must see what is pending

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None and not self.recycle

    def send(self, request: dict[str, Any]) -> bool:
        self.outstanding.append(request["id"])
        try:
            self._stdin.write(json.dumps(request).encode() + b"\n")
            self._stdin.flush()
            return True
        except (BrokenPipeError, ValueError, OSError):
            return False

    def _line(self, timeout: float | None) -> bytes | None:
        """One reply line; b"" once the host closed its end, None when ``timeout`` passed."""
        while b"\n" not in self._buffer:
            if timeout is not None:
                ready, _, _ = select.select([self._fd], [], [], max(timeout, 0))
                if not ready:
                    return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                return b""
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def read(self, timeout: float | None) -> bool:
        """Take the next reply into :attr:`replies`; False when nothing came in ``timeout``.
        When the host died, :attr:`dead_code` is set."""
        if self.dead_code is not None:
            return True
        line = self._line(timeout)
        if line is None:
            return False
        if self.ready is None and (line or not self.stopped):
            self._hello(line)
            return True
        if not line:
            self._died()
            return True
        reply: dict[str, Any] = json.loads(line)
        self.replies[reply["id"]] = reply
        with contextlib.suppress(ValueError):
            self.outstanding.remove(reply["id"])
        return True

    def _hello(self, line: bytes) -> None:
        """Its first line: whether the task loaded. One that did not (or a host that ended
        first, not by our hand) is dead, and none of the shards sent to it started."""
        try:
            hello = json.loads(line) if line else {}
        except ValueError:
            hello = {}
        self.ready = bool(hello.get("ready"))
        self.error = hello.get("error") or (None if line else "its host ended as it started")
        if not self.ready:
            self._died()
            self.died_under = None

    def _died(self) -> None:
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            reaper.kill_group(self.proc.pid)
            code = self.proc.wait()
        reaper.kill_group(self.proc.pid)
        PROCESSES.forget(self.proc.pid)
        self.exit_status = code
        self.dead_code = self.exit_code(code)
        self.died_under = self.outstanding[0] if self.outstanding else None  # what it ran
        self.recycle = True

    def exit_code(self, code: int) -> int:
        """What a shard that died with this host reports for the host's exit status."""
        return code if code != 0 else 1  # a host never exits 0 with shards queued

    def begin_close(self) -> None:
        """Tell the host to exit once its queued shards are done (its input ends)."""
        with contextlib.suppress(OSError):
            self._stdin.close()

    def close(self) -> None:
        self.begin_close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            reaper.kill_group(self.proc.pid)
            self.proc.wait()
        reaper.kill_group(self.proc.pid)
        PROCESSES.forget(self.proc.pid)
        # Read what the host said before it ended, and mark it dead, before its pipe closes:
        # a shard still waiting on this host (a crash seen first by a poll, then a new host
        # started) must not wait on a closed descriptor whose number a new pipe reuses.
        for _ in range(50):
            if self.dead_code is not None or not self.read(0.1):
                break
        if self.dead_code is None:  # something else holds the pipe open: dead all the same
            self.exit_status = self.proc.returncode or 0
            self.dead_code = self.exit_code(self.exit_status)
            self.died_under = self.outstanding[0] if self.outstanding else None
            self.recycle = True
        with contextlib.suppress(OSError):
            self._stdout.close()


class HostTask(RunningTask):
    """One shard sent to a warm host; several may be queued on one host (short shards)."""

    def __init__(self, host: Host, request_id: int, token: str, log_path: Path):
        self._host = host
        self._id = request_id
        self.pid = host.proc.pid
        self.token = token
        self._log_path = log_path
        self._code: int | None = None
        self.not_started = False  # the host died before it reached this shard

    @property
    def loading(self) -> bool:
        """Whether its host has not yet said its task loaded (``task.py`` is being imported)."""
        return self._host.ready is None

    def stop(self, grace: float) -> int | None:
        self._host.stopped = True
        return super().stop(grace)

    def wait(self, timeout: float | None) -> int | None:
        if self._code is not None:
            return self._code
        host = self._host
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._id not in host.replies and host.dead_code is None:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not host.read(left) and (deadline is None or time.monotonic() >= deadline):
                return None
        reply = host.replies.pop(self._id, None)
        if reply is not None:
            self._code = int(reply["exit"])
            self.reason = reply.get("reason")
            self.returned = reply.get("return")
            host.recycle = host.recycle or bool(reply.get("recycle"))
            PROCESSES.discard(self.token)  # the host killed its own leftovers
            return self._code
        # The host died: under this shard (os._exit, a crash, our own kill), or before it.
        assert host.dead_code is not None
        self.not_started = host.died_under != self._id
        with contextlib.suppress(ValueError):
            host.outstanding.remove(self._id)
        PROCESSES.ended(self.token, host.proc.pid)
        self._code = host.dead_code
        if not self.not_started and self._code >= 0:
            status = self._code if host.exit_status is None else host.exit_status
            said = f"the task's process exited with code {status} mid-shard"
            if status == 0:  # os._exit(0): as good as a crash, since run(shard) never returned
                said = self.reason = EXITED_0
            with contextlib.suppress(OSError), self._log_path.open("a") as log:
                log.write(f"cflow: {said}\n")
        return self._code
