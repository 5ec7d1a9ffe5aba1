"""Every process an attempt started is gone when the attempt ends.

A task may leave children behind: a plain ``subprocess.Popen`` it never waits for, or a daemon in
a new session that escapes its process group. Two Linux mechanisms catch them all:

- the process that starts attempts (the worker agent, and each warm task host) is a **child
  subreaper** (``PR_SET_CHILD_SUBREAPER``): an orphan anywhere below it is reparented to it, not to
  init, so it stays in the tree the worker can see;
- every attempt's environment carries ``CFLOW_ATTEMPT_TOKEN``, which the processes it starts
  inherit, so an orphan reparented to the worker is matched to its attempt through
  ``/proc/<pid>/environ`` and killed once that attempt has ended, never while it runs.

Elsewhere (no ``/proc``) only the process group is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Collection, Iterable
from pathlib import Path

TOKEN_VAR = "CFLOW_ATTEMPT_TOKEN"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PROC = Path("/proc")

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _prctl(option: int, value: int) -> bool:
    try:
        return _LIBC is not None and _LIBC.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:  # not Linux
        return False


def become_subreaper() -> bool:
    """Make orphans below this process its children; False where the OS cannot."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent thread exits."""
    _prctl(_PR_SET_PDEATHSIG, int(sig))


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (of all its threads), from ``/proc``; [] where unknown."""
    out: list[int] = []
    try:
        tasks = os.listdir(_PROC / str(pid) / "task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = (_PROC / str(pid) / "task" / tid / "children").read_text()
        except OSError:
            continue
        out.extend(int(p) for p in text.split())
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before their children."""
    found: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children(child))
    return found


def token_of(pid: int) -> str | None:
    """The attempt token in a process's environment, or None (none, or not readable)."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return None
    prefix = TOKEN_VAR.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def reap(pids: Iterable[int]) -> None:
    """Collect the exit status of these (dead or dying) children, so no zombie stays."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)


def kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_descendants(pid: int, *, rounds: int = 20) -> int:
    """Kill everything below ``pid`` (this process: the warm host after an attempt) and reap
    what becomes its children; repeats while something forks in between. How many died."""
    total = 0
    own = pid == os.getpid()
    for _ in range(rounds):
        found = descendants(pid)
        if not found:
            break
        total += len(found)
        kill_all(found)
        if own:  # the killed reparent to us (a subreaper): reap our direct children
            reap(children(pid))
    return total


def sweep_orphans(owner: int, *, live_tokens: Collection[str], known: Collection[int]) -> int:
    """Kill the orphans reparented to ``owner`` (this worker) whose attempt has ended.

    ``known``: the owner's own children (task hosts, running shell tasks), left alone;
    ``live_tokens``: attempts still running, whose orphans may be doing real work. An orphan
    without a token is killed too: nothing but an attempt puts processes below the worker.
    Returns how many processes were killed.
    """
    total = 0
    for _ in range(20):
        victims: list[int] = []
        direct: list[int] = []
        for child in children(owner):
            if child in known:
                continue
            token = token_of(child)
            if token is not None and token in live_tokens:
                continue
            direct.append(child)
            victims.append(child)
            victims.extend(descendants(child))
        if not victims:
            break
        kill_all(victims)
        total += len(victims)
        if owner == os.getpid():
            reap(direct)
    return total
