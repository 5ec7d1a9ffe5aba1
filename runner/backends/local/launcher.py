"""Local workers forked from the calling process rather than started as new interpreters.

A run made from Python (``cflow``) is watched by a process that has imported most of what a
worker runs; starting each worker as ``python -m worker`` spends a fresh interpreter's start and
imports on it, most of a short run's time. A :class:`Launcher` is forked from the caller once,
before the run's thread starts and only while the caller has one thread (a fork copies every
lock another thread may hold at that moment, held for ever in the child); it never starts a
thread itself, so each worker it forks on request starts from a one-thread process.

Before the fork the caller closes its connections to any store's SQLite file (they open again
when next used): a worker's own connection to a file the caller had open would otherwise share
the SQLite state the fork copied, locks the child does not hold included, and corrupt the
write-ahead log (``worker.backends.local.db.close_before_fork``). The launcher drops every
descriptor it inherited (each pointed at ``/dev/null``, so a stale file
object of the caller's that is collected later closes a ``/dev/null``, never a descriptor the
worker has opened since). A worker it forks becomes one as ``python -m worker ARGS`` would: its
own session (Ctrl-C in the caller's terminal does not reach it), stdin from ``/dev/null``, stdout
and stderr to its log, the signal handlers and mask of a new interpreter, none of the caller's
logging handlers, and it ends with ``os._exit`` (the caller's ``atexit`` handlers and finalizers
never run in it). Its command line is still the caller's, so the fleet's registry records its
start time (``/proc/PID/stat``) to recognise it, pid and start time naming one process.

The run says how many workers it is sure to need (``runner.preflight.early_workers``: the items'
chunks, at most its workers) and the launcher forks that many ahead, as it starts, while the
caller bundles and makes the run; each waits on a pipe of its own to be told its arguments, so
the run's first workers are there the moment it asks (a fork of the launcher takes several
milliseconds), and one never asked for exits when the launcher closes. The launcher loads the
worker's code in the caller's process (this module imports it), not after the fork.

Where forking is not safe (other threads, a Jupyter kernel, a system without ``fork``), or with
``CFLOW_FORK_WORKERS=0``, :meth:`Launcher.start` returns None and workers are spawned as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import worker
from worker import cli  # loaded in the caller, so neither the launcher nor a worker loads it
from worker.backends.local.db import close_before_fork
from worker.executors.host import fresh_interpreter, to_devnull

logger = logging.getLogger("cflow.runner")

THREAD_EXIT_SECONDS = 0.05  # how long an ended thread may take to leave /proc/self/task
FORK_ENV = "CFLOW_FORK_WORKERS"  # "0": always start local workers as new interpreters
_STAT_STARTTIME = 19  # field 22 of /proc/PID/stat, counted from the state (field 3)

_current = threading.local()


def process_start(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[-1].split()
    except OSError:
        return None
    if fields[0] == b"Z":
        return None
    return int(fields[_STAT_STARTTIME])


def can_fork() -> bool:
    """Whether this process may fork a launcher now: the main thread of a process that has
    one thread (``/proc/self/task`` counts those a C library started too; one Python has
    joined is given up to 50 ms to leave it), outside a Jupyter kernel, and not turned off with
    ``CFLOW_FORK_WORKERS=0``."""
    if os.environ.get(FORK_ENV, "1") == "0" or not hasattr(os, "fork"):
        return False
    if threading.current_thread() is not threading.main_thread() or "ipykernel" in sys.modules:
        return False
    # A thread Python has joined may still be ending in the system for a moment (a run's
    # thread, just let go): wait that moment out, not for a library's threads that stay.
    deadline = time.monotonic() + THREAD_EXIT_SECONDS
    while True:
        try:
            if len(os.listdir("/proc/self/task")) == 1:
                return True
        except OSError:
            return False
        if threading.active_count() > 1 or time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


class ForkedWorker:
    """A worker forked by a launcher: not this process's child, known by pid and start time."""

    def __init__(self, pid: int, start: int):
        self.pid = pid
        self.start = start

    def poll(self) -> int | None:
        """None while it runs; its exit status is its parent's to know, so -1 once gone."""
        return None if process_start(self.pid) == self.start else -1

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Until it has exited (a pidfd: it is not our child to wait for).

        Raises:
            subprocess.TimeoutExpired: it still runs after ``timeout`` seconds.
        """
        with contextlib.suppress(OSError):  # gone already
            fd = os.pidfd_open(self.pid)
            try:
                if self.poll() is None:
                    select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
        return -1


class Launcher:
    """A one-thread process forked from the caller that forks its local workers."""

    def __init__(self, pid: int, requests: int, replies: int):
        self.pid = pid
        self._requests = requests
        self._replies = os.fdopen(replies, "rb")
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def start(cls, standby: int = 0) -> Launcher | None:
        """A launcher forked from this process, or None where that is not safe. It forks
        ``standby`` workers ahead, each waiting to be told its arguments, so the first workers
        a run asks for start without waiting for a fork (the run says how many it is sure to
        need); a standby never told is gone when the launcher closes."""
        if not can_fork():
            return None
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            with contextlib.suppress(Exception):
                stream.flush()
        close_before_fork()  # a worker it forks opens the store the caller may have open
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the launcher's own process
            code = 0
            try:
                os.close(req_w)
                os.close(rep_r)
                _serve(req_r, rep_w, standby)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        return cls(pid, req_w, rep_r)

    def fork_workers(self, workers: list[tuple[list[str], Path]]) -> list[ForkedWorker | OSError]:
        """Workers running ``python -m worker ARGS``, each with its output appended to its
        log, asked for at once (one trip to the launcher, not one each); each the worker, or
        why the launcher could not start it (the caller then spawns that one).

        Raises:
            OSError: the launcher is gone (the caller then spawns them all).
        """
        requests = b"".join(
            json.dumps({"args": args, "log": str(log)}).encode() + b"\n" for args, log in workers
        )
        with self._lock:
            if self._closed:
                raise OSError("the launcher was closed")
            os.write(self._requests, requests)
            lines = [self._replies.readline() for _ in workers]
        out: list[ForkedWorker | OSError] = []
        for line in lines:
            if not line:
                raise OSError("the launcher exited")
            reply = json.loads(line)
            if "error" in reply:
                out.append(OSError(reply["error"]))
            else:
                out.append(ForkedWorker(int(reply["pid"]), int(reply["start"])))
        return out

    def close(self) -> None:
        """The launcher exits (its workers go on); waits for it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._requests)
            self._replies.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def start_workers(
    workers: list[tuple[list[str], Path]],
) -> list[ForkedWorker | subprocess.Popen[bytes]]:
    """Workers running ``python -m worker ARGS``, each with its output appended to its log:
    forked by this thread's launcher if it has one (a run made from Python), all asked for at
    once; else, or where it could not, new interpreters."""
    forked: list[ForkedWorker | OSError] = [OSError("no launcher")] * len(workers)
    launcher = current()
    if launcher is not None:
        try:
            forked = launcher.fork_workers(workers)
        except OSError as exc:  # the launcher is gone: new interpreters do the same
            forked = [exc] * len(workers)
    procs: list[ForkedWorker | subprocess.Popen[bytes]] = []
    for (args, log), got in zip(workers, forked, strict=True):
        if isinstance(got, ForkedWorker):
            procs.append(got)
            continue
        if launcher is not None:
            logger.debug("spawning a worker: %s", got)
        with log.open("ab") as out:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "worker", *args],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    return procs


@contextlib.contextmanager
def used_by_this_thread(launcher: Launcher | None) -> Iterator[None]:
    """Local workers started by this thread inside the block are forked by ``launcher``."""
    before = getattr(_current, "launcher", None)
    _current.launcher = launcher
    try:
        yield
    finally:
        _current.launcher = before


def current() -> Launcher | None:
    """The launcher of this thread's run, if it has one."""
    launcher: Launcher | None = getattr(_current, "launcher", None)
    return launcher


def _serve(requests: int, replies: int, standby: int) -> None:  # pragma: no cover - launcher
    """The launcher's loop: a worker per request line (a standby told its arguments, else one
    forked then), its pid and start time replied, until the caller closes its end."""
    os.setsid()
    inherited = [int(fd) for fd in os.listdir("/proc/self/fd")]
    to_devnull([fd for fd in inherited if fd not in (requests, replies)])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's Ctrl-C is the caller's
    signal.signal(signal.SIGCHLD, _reap)
    cli.parse_args([])  # its parser's first use too (the regular expressions argparse compiles)

    own = [requests, replies]
    standbys: list[tuple[int, int]] = []  # (pid, the write end it reads its request from)
    for _ in range(standby):
        with contextlib.suppress(OSError):  # one fewer ahead: it is forked when asked
            standbys.append(_standby(cli.main, own + [fd for _, fd in standbys]))
    with os.fdopen(requests, "rb") as lines:
        for line in lines:
            reply: dict[str, Any] = {}
            while standbys and not reply:
                pid, told = standbys.pop(0)
                with contextlib.suppress(OSError):  # gone (killed): the next, or a fork
                    os.write(told, line)
                    reply = _started(pid)
                os.close(told)
            if not reply:
                reply = _fork(cli.main, json.loads(line), own + [fd for _, fd in standbys])
            os.write(replies, json.dumps(reply).encode() + b"\n")


def _fork(main: Any, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """A worker forked now for ``request``: the reply (its pid and start time, or an error)."""
    # SIGCHLD held: a worker that exits at once is still there to read its start time.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            _worker(main, request["args"], Path(request["log"]), fds)
        return _started(pid)
    except OSError as exc:
        return {"error": f"could not fork a worker: {exc}"}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def _standby(main: Any, fds: list[int]) -> tuple[int, int]:
    """A worker forked ahead: it waits for its request on a pipe of its own, then runs it, or
    exits when the pipe closes unused (the launcher closed, or was killed)."""
    told, tell = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(tell)
            to_devnull(fds)  # the launcher's pipes and the other standbys' (see to_devnull)
            with os.fdopen(told, "rb") as waiting:
                line = waiting.readline()
            if line:
                request = json.loads(line)
                _worker(main, request["args"], Path(request["log"]), [])
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(told)
    return pid, tell


def _started(pid: int) -> dict[str, Any]:
    """The reply for worker ``pid``: its pid and start time, or an error if it is gone."""
    start = process_start(pid)
    if start is None:
        return {"error": f"the forked worker {pid} exited at once"}
    return {"pid": pid, "start": start}


def _reap(signum: int, frame: object) -> None:  # pragma: no cover - the launcher's process
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _worker(main: Any, args: list[str], log: Path, launcher_fds: list[int]) -> None:
    """In the forked child: become ``python -m worker ARGS``; never returns."""
    code = 1
    try:
        os.setsid()
        to_devnull(launcher_fds)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        fresh_interpreter([str(Path(worker.__file__).with_name("__main__.py")), *args])
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
