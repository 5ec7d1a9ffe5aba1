"""The process a run is bound to: a ``cflow`` map or submit that waits for its run.

Such a run records its caller (:data:`RunOptions.caller`) as this machine's boot id, the
caller's pid and its start time (``/proc/PID/stat``, so a reused pid is never taken for it).
Ctrl-C in the caller cancels the run; a caller that dies without a word (``kill -9``, the OOM
killer, an outer item's timeout killing the process that mapped inside it) cannot. Each worker
on the same machine that reads the run's manifest afresh sees the caller gone and halts the run
(:meth:`worker.agent.runbook.RunBook.manifest`), so its workers stop and go instead of
finishing work nobody reads. A detached run, or one made in a notebook's kernel, records none
and goes on; so does any run on Google Cloud's workers (another machine cannot tell).
"""

from __future__ import annotations

import os

_STAT_STARTTIME = 19  # field 22 of /proc/PID/stat, counted from the state (field 3)
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


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


def _boot_id() -> str | None:
    try:
        with open(_BOOT_ID, encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def stamp() -> str | None:
    """This process as a run records its caller: ``BOOT:PID:START`` (None where ``/proc``
    cannot tell, and the run is bound to nothing)."""
    boot, start = _boot_id(), process_start(os.getpid())
    if boot is None or start is None:
        return None
    return f"{boot}:{os.getpid()}:{start}"


def gone(caller: str | None) -> int | None:
    """The pid of the caller ``caller`` names when it is known to be gone: it ran on this
    machine since its last boot and that process no longer lives. None otherwise (no caller,
    another machine, or it lives)."""
    if not caller:
        return None
    boot, _, rest = caller.partition(":")
    pid, _, start = rest.partition(":")
    if not (pid.isdigit() and start.isdigit()) or boot != _boot_id():
        return None
    return None if process_start(int(pid)) == int(start) else int(pid)
