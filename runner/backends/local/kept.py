"""A launcher kept from one run to the next (see :mod:`runner.backends.local.launcher`).

A run made from Python asks :func:`for_run` for its launcher and hands it to :func:`after_run`
once the run has let its workers go: the kept launcher then forks as many ahead again, so a
script's or a loop's later maps find their workers waiting and no fork of the caller is made
for them. Each worker is still started as the caller is at its run (the request carries the
caller's environment, folder and import path).

What a launcher forked from the caller holds is the caller's memory as it was then, shared
until the caller changes or frees it, and every worker it forks maps all of it: each fork
copies the page tables of that memory and each exit takes them down again (a caller holding
4 GiB spent 0.3 s a map on that, against 0.05 s). So a launcher is forked only from a caller
using at most :data:`KEEP_RSS` bytes; a larger caller is treated as one that may not fork.
A caller that may not fork (more memory than that, other threads, a Jupyter kernel) spawns its
first run's workers; once it has let them go, a launcher is started as a new interpreter,
holding none of the caller's memory, kept for the next runs (started before the run, its
loading would hold the run's first workers back). A kept launcher exits after
:data:`~runner.backends.local.launcher_process.IDLE_SECONDS` without a run; one that exited
(idle, killed) or is a parent's (this process was forked since) is replaced.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Sequence

from runner.backends.local.launcher import FORK_ENV, Launcher

logger = logging.getLogger("cflow.runner")

KEEP_RSS = 256 << 20  # a caller using more memory forks no launcher (a new interpreter is one)

_kept: Launcher | None = None  # this process's, kept from one run to the next
_kept_lock = threading.Lock()


def for_run(ahead: int, preload: Sequence[str] = ()) -> Launcher | None:
    """The launcher for a run about to be made, with ``ahead`` workers forked ahead: the one
    kept from an earlier run, else one forked now where that is safe
    (:func:`~runner.backends.local.launcher.can_fork`) and this process uses at most
    :data:`KEEP_RSS` bytes.
    None with ``CFLOW_FORK_WORKERS=0``, or where none is kept and the caller may not fork:
    the run's workers are then new interpreters, and :func:`after_run` starts a launcher as
    one for the next run (started now, its loading would hold the run's first workers back).
    A kept one that exited (idle, or killed) or is a parent's (this process was forked since)
    is replaced. Hand what it gives to :func:`after_run` once the run has let its workers go.
    ``preload``: the installed modules the run's function names, which the spare task host
    of each worker forked ahead imports while it waits (:meth:`Launcher.keep_ahead`)."""
    global _kept
    if os.environ.get(FORK_ENV, "1") == "0":
        return None
    with _kept_lock:
        launcher = _kept
        if launcher is not None and not launcher.alive:
            launcher.close()
            launcher = _kept = None
        if launcher is None:
            if _resident() > KEEP_RSS:  # every worker it forked would map all of this process
                return None
            launcher = _kept = Launcher.start(
                standby=ahead, preload=preload, in_child=forget_in_child
            )
            return launcher
    try:
        launcher.keep_ahead(ahead, preload)
    except OSError as exc:  # it exited just now: the run's workers are spawned
        logger.debug("the kept launcher is gone: %s", exc)
    return launcher


def after_run(launcher: Launcher | None, ahead: int, preload: Sequence[str] = ()) -> None:
    """A run has let its workers go: its launcher (the kept one) forks ``ahead`` workers
    ahead again for the next run (returning once they are ready, so the next run and whatever
    this process does meanwhile never share the machine with those forks). A run that had
    none (the caller may not fork: more memory than :data:`KEEP_RSS`, other threads, a Jupyter
    kernel) starts one as a new interpreter, kept, with ``ahead`` workers ready, unless one is
    kept already. ``preload``: as for :func:`for_run` (the next run's function is most often
    this one's, or one of the same modules)."""
    global _kept
    if launcher is None:
        if os.environ.get(FORK_ENV, "1") == "0" or ahead < 1:
            return
        with _kept_lock:
            if _kept is None or not _kept.alive:
                # It holds none of this process's memory, nor its modules: its hosts import
                # those the function named.
                _kept = Launcher.spawn(standby=ahead, preload=preload)
        return
    try:
        launcher.keep_ahead(ahead, preload)
    except OSError as exc:
        logger.debug("the kept launcher is gone: %s", exc)


def kept() -> Launcher | None:
    """This process's kept launcher, if it is running (its next run's workers are forked by
    it, whatever threads this process has since)."""
    launcher = _kept
    return launcher if launcher is not None and launcher.alive else None


def close_kept() -> None:
    """The kept launcher exits (its workers go on), as it does at this process's exit."""
    global _kept
    with _kept_lock:
        launcher, _kept = _kept, None
    if launcher is not None:
        launcher.close()


atexit.register(close_kept)


def forget_in_child() -> None:
    """In a launcher just forked (:meth:`Launcher.start`): it keeps none of its caller's
    launcher, which is the caller's, and :data:`_kept_lock`, held while :func:`for_run` forks
    it, would be held for ever in it and in every worker and task host it forks (a function
    mapping with ``cflow.map`` itself waited there until its timeout)."""
    global _kept, _kept_lock
    _kept = None
    _kept_lock = threading.Lock()


def _resident() -> int:
    """Bytes of memory this process has resident."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return KEEP_RSS + 1  # unknown: taken for large (no launcher forked)
