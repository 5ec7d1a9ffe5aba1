"""Local workers forked from the calling process rather than started as new interpreters.

A run made from Python (``cflow``) is watched by a process that has imported most of what a
worker runs; starting each worker as ``python -m worker`` spends a fresh interpreter's start and
imports on it, most of a short run's time. A :class:`Launcher` is forked from the caller before
the run's thread starts and only while the caller has one thread (a fork copies every lock
another thread may hold at that moment, held for ever in the child); it never starts a thread
itself, so each worker it forks on request starts from a one-thread process (its own loop:
:mod:`runner.backends.local.launcher_process`).

Before the fork the caller closes its connections to any store's SQLite file (they open again
when next used): a worker's own connection to a file the caller had open would otherwise share
the SQLite state the fork copied, locks the child does not hold included, and corrupt the
write-ahead log (``worker.backends.local.db.close_before_fork``). The launcher drops every
descriptor it inherited (each pointed at ``/dev/null``, so a stale file
object of the caller's that is collected later closes a ``/dev/null``, never a descriptor the
worker has opened since). A worker it forks becomes one as ``python -m worker ARGS`` would,
started by the caller as it is at that moment: the caller's environment, working folder and
import path (sent with each request), its own session (Ctrl-C in the caller's terminal does not
reach it), stdin from ``/dev/null``, stdout and stderr to its log, the signal handlers and mask
of a new interpreter, none of the caller's logging handlers, and it ends with ``os._exit`` (the
caller's ``atexit`` handlers and finalizers never run in it). Its command line is still the
caller's: the fleet's registry knows it, as every worker, by pid and start time
(``/proc/PID/stat``).

The run says how many workers it is sure to need (``runner.preflight.early_workers``: the items'
chunks, at most its workers) and the launcher forks that many ahead, each with a spare task host
of its own, while the caller bundles and makes the run; each waits on a pipe of its own to be
told its arguments, so the run's first workers are there the moment it asks, and one never asked
for exits when the launcher does. The launcher loads the worker's code in the caller's process
(this module imports it), not after the fork.

A launcher is kept from one run to the next, forking as many ahead again once a run has let its
workers go (:mod:`runner.backends.local.kept`); one kept from earlier goes on serving a caller
that has threads since (it has one, and forks from itself). Where forking the caller is not
safe (other threads, a Jupyter kernel), a launcher can be started as a new interpreter instead
(:meth:`Launcher.spawn`). With ``CFLOW_FORK_WORKERS=0``, or on a system without ``fork``,
there is no launcher: workers are started as new interpreters, as ``runner submit`` starts
them.
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from runner.backends.local.launcher_process import serve
from worker.agent.caller import process_start
from worker.backends.local.db import close_before_fork

logger = logging.getLogger("cflow.runner")

THREAD_EXIT_SECONDS = 0.05  # how long an ended thread may take to leave /proc/self/task
FORK_ENV = "CFLOW_FORK_WORKERS"  # "0": always start local workers as new interpreters
# A launcher answers in milliseconds (one asked for workers ahead waits up to 5 s for them, one
# started as a new interpreter loads first): one silent this long is taken for frozen.
ASK_SECONDS = 15.0

_current = threading.local()


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
    """A one-thread process that forks the caller's local workers: forked from the caller
    (:meth:`start`), or started as a new interpreter (:meth:`spawn`)."""

    def __init__(self, pid: int, requests: int, replies: int):
        self.pid = pid
        self._requests = requests
        self._replies = replies
        self._buffered = b""  # what was read of the replies past the last whole line
        self._lock = threading.Lock()
        self._closed = False
        self._owner = os.getpid()
        self.ahead = 0  # workers waiting forked ahead, as the launcher last said
        self.ahead_seconds = 0.0  # time spent waiting for workers to be forked ahead
        self._proc: subprocess.Popen[bytes] | None = None  # one started as a new interpreter

    @classmethod
    def start(
        cls,
        standby: int = 0,
        preload: Sequence[str] = (),
        in_child: Callable[[], None] | None = None,
    ) -> Launcher | None:
        """A launcher forked from this process, or None where that is not safe. It forks
        ``standby`` workers ahead, each waiting to be told its arguments, so the first workers
        a run asks for start without waiting for a fork (the run says how many it is sure to
        need); a standby never told is gone when the launcher closes. The spare task host of
        each imports the modules ``preload`` names while it waits (see :meth:`keep_ahead`).
        ``in_child`` runs first in the launcher: what the fork copied of the caller's that is
        not the launcher's (a lock held as it forked) is let go there."""
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
                if in_child is not None:
                    in_child()
                os.close(req_w)
                os.close(rep_r)
                serve(req_r, rep_w, standby, preload=preload)
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(rep_w)
        launcher = cls(pid, req_w, rep_r)
        launcher.ahead = standby
        return launcher

    @classmethod
    def spawn(cls, standby: int = 0, preload: Sequence[str] = ()) -> Launcher | None:
        """A launcher started as a new interpreter (``python -m
        runner.backends.local.launcher_process STANDBY``), for a caller that may not fork
        (other threads, a Jupyter kernel): it loads the worker's code itself, then serves as a
        forked one does, holding none of the caller's memory. Returns
        once it has said it is ready, its ``standby`` workers with it; None where it could not
        be started or ended first. ``preload``: as for :meth:`start`."""
        if not hasattr(os, "fork"):
            return None
        env = dict(os.environ)  # its workers take the caller's from each request
        here = str(Path(__file__).resolve().parents[3])  # where `runner` is imported from
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        try:
            module = "runner.backends.local.launcher_process"
            proc = subprocess.Popen(
                [sys.executable, "-m", module, str(standby), json.dumps(list(preload))],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in the caller's terminal is the caller's
            )
        except OSError as exc:
            logger.debug("could not start a launcher: %s", exc)
            return None
        assert proc.stdin is not None and proc.stdout is not None
        requests, replies = os.dup(proc.stdin.fileno()), os.dup(proc.stdout.fileno())
        proc.stdin.close()
        proc.stdout.close()
        launcher = cls(proc.pid, requests, replies)
        launcher._proc = proc
        try:
            (hello,) = launcher._ask(b"", 1)  # its first line: ready, with its workers ahead
        except (OSError, ValueError) as exc:
            logger.debug("the launcher started as a new interpreter ended: %s", exc)
            launcher.close()
            return None
        launcher.ahead = int(hello.get("ahead", 0))
        return launcher

    def fork_workers(self, workers: list[tuple[list[str], Path]]) -> list[ForkedWorker | OSError]:
        """Workers running ``python -m worker ARGS``, each with its output appended to its
        log, asked for at once (one trip to the launcher, not one each); each the worker, or
        why the launcher could not start it (the caller then spawns that one).

        Raises:
            OSError: the launcher is gone (the caller then spawns them all).
        """
        where = {"env": dict(os.environ), "cwd": os.getcwd(), "path": list(sys.path)}
        requests = b"".join(
            json.dumps({"args": args, "log": str(log), **where}).encode() + b"\n"
            for args, log in workers
        )
        out: list[ForkedWorker | OSError] = []
        for reply in self._ask(requests, len(workers)):
            if "error" in reply:
                out.append(OSError(reply["error"]))
            else:
                out.append(ForkedWorker(int(reply["pid"]), int(reply["start"])))
        return out

    def keep_ahead(self, count: int, preload: Sequence[str] = ()) -> None:
        """Have ``count`` workers forked ahead, waiting to be told their arguments (more are
        forked now where fewer wait; none go). The spare task host each forks imports the
        modules ``preload`` names while it waits (the modules the run's function named: a
        launcher started as a new interpreter has none of the caller's, and one forked holds
        those loaded before it was); what cannot be imported is left to the task.

        Raises:
            OSError: the launcher is gone.
        """
        if count > self.ahead:
            began = time.perf_counter()
            try:
                request = {"ahead": count, "preload": list(preload)}
                self._ask(json.dumps(request).encode() + b"\n", 1)
            finally:
                self.ahead_seconds += time.perf_counter() - began

    def _ask(self, requests: bytes, count: int) -> list[dict[str, Any]]:
        """Send request lines, read their ``count`` replies; each says how many wait ahead.

        Raises:
            OSError: the launcher is closed, another process's, exited, or did not answer
                within :data:`ASK_SECONDS` (taken for frozen: it is killed).
        """
        with self._lock:
            if self._closed:
                raise OSError("the launcher was closed")
            if os.getpid() != self._owner:
                raise OSError("the launcher is another process's (this one was forked since)")
            if requests:
                os.write(self._requests, requests)
            deadline = time.monotonic() + ASK_SECONDS
            replies = []
            for _ in range(count):
                line = self._line(deadline)
                if not line:
                    raise OSError("the launcher exited")
                replies.append(json.loads(line))
            self.ahead = int(replies[-1].get("ahead", 0))
        return replies

    def _line(self, deadline: float) -> bytes:
        """The next reply line (empty: the launcher exited); one that has not come by
        ``deadline`` means a frozen launcher (stopped, say): it is killed and closed."""
        while b"\n" not in self._buffered:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                self._abandon()
                raise OSError(f"the launcher did not answer in {ASK_SECONDS:g} s: stopped")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                return b""
            self._buffered += chunk
        line, _, self._buffered = self._buffered.partition(b"\n")
        return line

    def _abandon(self) -> None:
        """Kill a launcher that stopped answering and close it (the lock is held)."""
        self._closed = True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.close(self._requests)
        os.close(self._replies)
        self._wait()

    @property
    def alive(self) -> bool:
        """Whether it can be asked: not closed, this process's own, and running."""
        if self._closed or os.getpid() != self._owner:
            return False
        return process_start(self.pid) is not None

    def close(self) -> None:
        """The launcher exits (its workers go on); waits for it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if os.getpid() != self._owner:  # a forked copy: the launcher is the parent's
                return
            os.close(self._requests)
            os.close(self._replies)
        self._wait()

    def _wait(self) -> None:
        """Until the launcher process has exited (it is this process's child)."""
        if self._proc is not None:
            self._proc.wait()
            return
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
