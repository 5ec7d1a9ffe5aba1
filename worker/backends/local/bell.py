"""Doorbells: named pipes a process waits on between looks, rung when the look is worth it.

A run's bell is its runner's, rung by the worker whose settlement left the run with no message
(every shard committed or finally failed: the run may be over). A runner watching a short run
locally would otherwise see its end only at its next look (a few ms to a quarter of a second
later); with the bell it looks at once.

A worker's work bell (:func:`work_bell`) is its own, rung when its run's messages are published
or put back: a worker waiting for work takes it at once instead of at its next poll (its first
shards, published while it started, among them).

A bell is an optimisation only: a ring never waits (nobody listening, a full pipe, no named
pipes on this system: nothing happens), and a process that has no bell looks at its own pace.
The pipes live in ``queue.db-bells/`` beside the queue's file (never listed as store objects),
each made and removed by the process that waits on it (one killed leaves an empty pipe that
nobody rings).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import threading
from collections.abc import Iterable
from pathlib import Path

from worker.backends.local.records import QUEUE_FILE

BELLS = QUEUE_FILE + "-bells"


def bell_path(root: Path, run_id: str) -> Path:
    return root / BELLS / run_id


def work_bell(run_id: str, worker: str) -> str:
    """The name of ``worker``'s work bell, as one of ``run_id``'s workers."""
    return f"{run_id}.{worker}"


def ring_workers(root: Path, run_ids: Iterable[str]) -> None:
    """Ring the work bells of these runs' workers; never blocks, never raises."""
    prefixes = tuple({f"{run_id}." for run_id in run_ids})
    if not prefixes:
        return
    try:
        names = os.listdir(root / BELLS)
    except OSError:  # no bells here
        return
    ring(root, [name for name in names if name.startswith(prefixes)])


def ring(root: Path, run_ids: Iterable[str]) -> None:
    """Ring these runs' bells, where a runner waits on one; never blocks, never raises."""
    for run_id in run_ids:
        try:
            fd = os.open(bell_path(root, run_id), os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # no bell (ENOENT), nobody waiting on it (ENXIO)
            continue
        try:
            os.write(fd, b"!")
        except OSError:  # full (EAGAIN): it is rung already
            pass
        finally:
            os.close(fd)


class Bell:
    """A bell as its one listener waits on it (a run's, or a worker's work bell);
    :meth:`open` gives None where this system or folder has no named pipes."""

    def __init__(self, path: Path, read_fd: int, keep_fd: int):
        self.path = path
        self._read = read_fd
        # A writer of its own: without one the pipe reads as ended once a worker has rung and
        # closed it, and select() would return at once for ever.
        self._keep = keep_fd

    @classmethod
    def open(cls, root: Path, name: str) -> Bell | None:
        path = bell_path(root, name)
        if not hasattr(os, "mkfifo"):
            return None
        try:
            path.parent.mkdir(exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.mkfifo(path, 0o600)
            read_fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            keep_fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            os.close(read_fd)
            return None
        return cls(path, read_fd, keep_fd)

    def wait(self, seconds: float) -> bool:
        """Until the bell rings or ``seconds`` pass; True when it rang (every ring so far is
        taken)."""
        ready, _, _ = select.select([self._read], [], [], max(seconds, 0.0))
        if not ready:
            return False
        while True:
            try:
                if not os.read(self._read, 4096):
                    return True
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    return True
                raise

    def close(self) -> None:
        """Stop waiting on it; the pipe goes (a worker ringing later finds no bell)."""
        with contextlib.suppress(OSError):
            self.path.unlink()
        for fd in (self._read, self._keep):
            with contextlib.suppress(OSError):
                os.close(fd)


class WorkBell:
    """The work bell of a worker of one run, as its queue waits on it: opened on the first
    wait (the worker's name is known then), shared by the worker's slots, gone on close."""

    def __init__(self, root: Path, run_id: str):
        self._root = root
        self._run_id = run_id
        self._bell: Bell | None = None
        self._tried = False
        self._lock = threading.Lock()

    def of(self, worker: str) -> Bell | None:
        """The bell ``worker`` waits on (None where there are no named pipes)."""
        if not self._tried:
            with self._lock:
                if not self._tried:
                    self._bell = Bell.open(self._root, work_bell(self._run_id, worker))
                    self._tried = True
        return self._bell

    def ring(self) -> None:
        """Ring it, as its worker waits on it: never blocks, never raises, takes no lock (safe
        in a signal handler)."""
        bell = self._bell
        if bell is not None:
            ring(self._root, [bell.path.name])

    def close(self) -> None:
        with self._lock:
            if self._bell is not None:
                self._bell.close()
            self._bell, self._tried = None, False
