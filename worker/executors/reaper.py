"""Every process an attempt started is gone when the attempt ends.

A task may leave children behind: a plain ``subprocess.Popen`` it never waits for, or a daemon in
a new session that escapes its process group. Two Linux mechanisms catch them all:

- the process that starts attempts (the worker agent, and each warm task host) is a **child
  subreaper** (``PR_SET_CHILD_SUBREAPER``): an orphan anywhere below it is reparented to it, not to
  init, so it stays in the tree the worker can see;
- every attempt's environment carries ``CFLOW_ATTEMPT_TOKEN``, which the processes it starts
  inherit, so an orphan reparented to the worker is matched to its attempt through
  ``/proc/<pid>/environ`` and killed once that attempt has ended, never while it runs (a
  process that clears its whole environment loses its token, and with it this net; its process
  group still goes).

Elsewhere (no ``/proc``) only the process group is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Collection, Iterable
from pathlib import Path

TOKEN_VAR = "CFLOW_ATTEMPT_TOKEN"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_PROC = Path("/proc")
_UNSURE_PASSES = 25  # how often the sweep looks again at a child it could not read

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None


def _prctl(option: int, value: int) -> bool:
    try:
        return _LIBC is not None and _LIBC.prctl(option, value, 0, 0, 0) == 0
    except AttributeError:  # not Linux
        return False


def is_subreaper() -> bool:
    """Whether orphans below this process come back to it (Linux; False elsewhere)."""
    flag = ctypes.c_int(0)
    try:
        if _LIBC is None or _LIBC.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0):
            return False
    except AttributeError:
        return False
    return bool(flag.value)


def become_subreaper(on: bool = True) -> bool:
    """Make orphans below this process its children (or stop); False where the OS cannot."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0)


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


_UNSURE = ""  # token_of: the environment could not be read just now (a process mid-exec)


def token_of(pid: int) -> str | None:
    """The attempt token in a process's environment; None when it has none (or is gone), and
    ``_UNSURE`` (empty) when the environment reads empty or fails, as it does for a process
    caught inside ``execve`` while its new memory is set up: ask again a moment later."""
    try:
        raw = (_PROC / str(pid) / "environ").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return _UNSURE
    if not raw:
        return _UNSURE
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


def _zombie_group(pid: int) -> int | None:
    """A zombie's process group (kept in ``/proc`` until it is reaped); None if not a zombie."""
    try:
        fields = (_PROC / str(pid) / "stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[2]) if fields[0] == "Z" else None


def sweep_orphans(
    owner: int,
    *,
    live_tokens: Collection[str],
    known: Collection[int],
    groups: Collection[int] = (),
) -> int:
    """Kill the orphans reparented to ``owner`` (this worker) whose attempt has ended.

    Only processes that carry an attempt token are touched: ``known`` (the owner's own task
    hosts and shell tasks) and any other child of the owner (a container engine's client, a
    test harness's emulator) are left alone, and so are orphans of attempts still running
    (``live_tokens``), which may be doing real work. Zombies of the ended attempts' process
    ``groups`` are reaped. Returns how many processes were killed.
    """
    total = 0
    unsure_passes = 0
    for _ in range(20 + _UNSURE_PASSES):
        victims: list[int] = []
        direct: list[int] = []
        unsure = False
        for child in children(owner):
            if child in known:
                continue
            token = token_of(child)
            if not token:
                group = _zombie_group(child)
                if group is not None:  # a zombie has no environment left: known by its group
                    if owner == os.getpid() and group in groups:
                        reap([child])
                elif token == _UNSURE:
                    unsure = True
                continue
            if token in live_tokens:
                continue
            direct.append(child)
            victims.append(child)
            victims.extend(descendants(child))
        if victims:
            kill_all(victims)
            total += len(victims)
            if owner == os.getpid():
                reap(direct)
        elif unsure and unsure_passes < _UNSURE_PASSES:
            # An orphan caught mid-exec (``setsid cmd &`` just as its shell exited): its
            # environment, and with it its token, is readable again in a moment.
            unsure_passes += 1
            time.sleep(0.002)
        else:
            break
    return total
