"""What every executor shares: the attempt it hands the agent, the worker's own children, and the
surface the agent starts attempts through.

- :class:`RunningTask` is one attempt's process (group) as the agent sees it, whichever executor
  started it (a warm host, a zygote's child, bash, a container).
- :data:`PROCESSES` records this worker's children and its running attempts' tokens, so that
  the orphan sweep (:mod:`worker.executors.reaper`) kills what an ended attempt left behind.
- :class:`TaskExecutor` is what :class:`worker.executors.process.Executor` and
  :class:`worker.executors.container.executor.ContainerExecutor` both offer the agent.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import stat
import subprocess
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import worker
from worker.executors import reaper
from worker.taskapi import TaskShard

WORKER_PATH = str(Path(worker.__file__).resolve().parent.parent)
"""The folder that holds the ``worker`` package: on a task process's PYTHONPATH, so the task host
(:mod:`worker.executors.host`) and ``worker.taskapi`` import there too."""


class _Processes:
    """This worker's own children and its running attempts, for the orphan sweep."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known: set[int] = set()
        self.live: set[str] = set()

    def spawn(self, argv: list[str], token: str | None, **kwargs: Any) -> subprocess.Popen[bytes]:
        # The worker agent makes its process a subreaper (Agent.run), so orphans come back to it.
        with self.lock:  # a child is registered before any sweep can see it
            proc = subprocess.Popen(argv, **kwargs)
            self.known.add(proc.pid)
            if token is not None:
                self.live.add(token)
            return proc

    def forget(self, pid: int) -> None:
        with self.lock:
            self.known.discard(pid)

    def ended(self, token: str, group: int | None = None) -> None:
        """The attempt is over: kill the orphans it left (and any other ended attempt's), and
        reap what died of its process ``group``."""
        with self.lock:
            self.live.discard(token)
            reaper.sweep_orphans(
                os.getpid(),
                live_tokens=self.live,
                known=self.known,
                groups=() if group is None else (group,),
            )

    def begin(self, token: str) -> None:
        with self.lock:
            self.live.add(token)

    def discard(self, token: str) -> None:
        """The attempt ended with nothing left to sweep (its host killed its own leftovers)."""
        with self.lock:
            self.live.discard(token)

    def forget_all(self) -> None:
        """In a child just forked: its parent's children are not its own, and the lock may have
        been held by the fork (a task host is forked inside it)."""
        self.lock = threading.Lock()
        self.known = set()
        self.live = set()


PROCESSES = _Processes()


class RunningTask(ABC):
    """One attempt's process (group)."""

    pid: int | None = None
    token: str = ""
    reason: str | None = None  # the task's own account of a failure (a Python exception's line)
    # What run(shard) returned, as JSON, where it came with the attempt's end (a warm host's
    # reply) rather than in the output folder (worker.taskapi.RETURN_FILE).
    returned: str | None = None

    @abstractmethod
    def wait(self, timeout: float | None) -> int | None:
        """The exit code (negative: killed by that signal), or None if still running."""

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the attempt's process group."""
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is not ours yet (setsid pending): the leader alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, grace: float) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; the exit code."""
        self.signal(signal.SIGTERM)
        code = self.wait(grace)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(10.0)
        return code


class TaskExecutor(Protocol):
    """Starts attempts of one unpacked bundle; what the agent holds per bundle and image."""

    @property
    def queues(self) -> bool:
        """Whether several shards may be started at once on one slot (they queue there)."""
        ...

    def start(self, shard: TaskShard, log_path: Path, *, slot: int = 0) -> RunningTask:
        """Start one attempt on ``slot``; ``log_path``'s folder must exist. Creates the output
        folder and the attempt's empty working folder (:func:`task_cwd`)."""
        ...

    def begin_close(self) -> None:
        """Tell what runs the attempts to wind down; :meth:`close` waits for it."""
        ...

    def close(self) -> None:
        """End everything this executor started."""
        ...


def task_cwd(shard: TaskShard) -> Path:
    """The attempt's own working folder, a sibling of its output folder: a task's files written
    to its current directory are private to the attempt, never outputs, and gone after it."""
    return shard.output_dir.with_name(f"{shard.output_dir.name}.cwd")


def fresh_cwd(shard: TaskShard) -> Path:
    """:func:`task_cwd`, empty: the one this worker made for an earlier attempt in the same
    place, where that is still exactly as it was made (:func:`clear_cwd` leaves it so), else
    made afresh (whatever was there goes)."""
    cwd = task_cwd(shard)
    if not _as_made(cwd):
        remove_tree(cwd)
        cwd.mkdir(parents=True)
        _MADE[str(cwd)] = _identity(os.lstat(cwd))
    return cwd


def clear_cwd(shard: TaskShard) -> None:
    """After an attempt: its working folder emptied. One still exactly as this worker made it
    is kept for the next attempt in the same place (a short shard's attempt then makes and
    removes no folder); any other goes whole, and the next attempt makes it again."""
    cwd = task_cwd(shard)
    if not _as_made(cwd):
        _MADE.pop(str(cwd), None)
        remove_tree(cwd)


# The working folders this process made: path -> what they were as made (inode, mode with its
# set-id and sticky bits, owner, group, and the change time that any chmod, chown, ACL or entry
# made or removed since moves on).
_MADE: dict[str, tuple[int, int, int, int, int]] = {}


def _identity(info: os.stat_result) -> tuple[int, int, int, int, int]:
    return (info.st_ino, info.st_mode, info.st_uid, info.st_gid, info.st_ctime_ns)


def _as_made(path: Path) -> bool:
    """Whether ``path`` is a folder this process made, as it made it and with nothing in it."""
    made = _MADE.get(str(path))
    if made is None:
        return False
    try:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode) or _identity(info) != made:
            return False
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


def remove_tree(folder: Path) -> None:
    """Remove ``folder`` and everything in it, also what a task made read-only; anything else
    put in its place (a link, a file, a fifo) goes itself (what a link points at is never
    touched, nor its mode changed)."""

    def writable(func: Any, path: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            if not os.path.islink(path):  # chmod would change what a link points at
                os.chmod(path, 0o700)
            func(path)

    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(folder, onerror=writable)
    else:
        folder.unlink(missing_ok=True)


def wait_process(proc: subprocess.Popen[bytes], timeout: float | None) -> int | None:
    """The process's exit code, or None if it still runs after ``timeout`` seconds. Blocks on
    a pidfd rather than Popen's sleep-polling, so short tasks end promptly."""
    if timeout is not None and proc.returncode is None:
        fd = os.pidfd_open(proc.pid)
        try:
            select.select([fd], [], [], timeout)
        finally:
            os.close(fd)
    try:
        return proc.wait(0 if timeout is not None else None)
    except subprocess.TimeoutExpired:
        return None


def pdeathsig() -> None:
    """Make the calling process die with its parent, the worker; a ``preexec_fn``, it runs in
    the child between fork and exec."""
    reaper.die_with_parent()
