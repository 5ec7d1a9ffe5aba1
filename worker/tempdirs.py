"""CFlow's temporary folders, named for the process that made them, so that what a killed
process leaves behind is removed by the next one.

A folder made with :func:`temp_folder` goes when it is done with (it is a
:class:`tempfile.TemporaryDirectory`), unless its process is killed first (SIGKILL, the OOM
killer, a forked child ending with ``os._exit``): it then stays in ``/tmp``, and some hold a
run's whole list of shards (a stream's spool of 860 MB was found so). Each is named
``cflow-<kind>-<pid>-<random>``, and the first folder a process makes sweeps away every such
folder of this user whose process is gone and which has not changed for
:data:`ORPHAN_SECONDS` (a process of another PID namespace sharing ``/tmp`` looks gone from
here: its folders are left while they change).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

ORPHAN_SECONDS = 600.0  # a gone process's folder unchanged this long is removed
_NAME = re.compile(r"^cflow-[a-z]+(?:-[a-z]+)*-(\d{1,10})-[a-z0-9_]{8}$")
_swept = False
_swept_lock = threading.Lock()


def temp_folder(kind: str) -> tempfile.TemporaryDirectory[str]:
    """A new temporary folder ``cflow-<kind>-<pid>-<random>`` in the system's temporary
    folder, gone when done with; this process's first also sweeps away those killed processes
    left (:func:`sweep_orphans`)."""
    _sweep_once()
    return tempfile.TemporaryDirectory(prefix=_prefix(kind))


def kept_temp_folder(kind: str) -> Path:
    """A temporary folder as :func:`temp_folder` makes, for one its process keeps to its end:
    the next process's sweep removes it once this one has ended."""
    _sweep_once()
    return Path(tempfile.mkdtemp(prefix=_prefix(kind)))


def _prefix(kind: str) -> str:
    return f"cflow-{kind}-{os.getpid()}-"


def _sweep_once() -> None:
    global _swept
    with _swept_lock:
        if not _swept:
            _swept = True
            sweep_orphans()


def sweep_orphans(parent: Path | None = None, *, older: float = ORPHAN_SECONDS) -> list[str]:
    """Remove every ``cflow-<kind>-<pid>-<random>`` folder of this user in ``parent`` (the
    system's temporary folder) whose process is gone and that has not changed for ``older``
    seconds; the names removed."""
    parent = Path(tempfile.gettempdir()) if parent is None else parent
    try:
        names = os.listdir(parent)
    except OSError:
        return []
    removed, now, uid = [], time.time(), os.getuid()
    for name in names:
        match = _NAME.match(name)
        if match is None or pid_alive(int(match.group(1))):
            continue
        path = parent / name
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            if info.st_uid != uid or now - info.st_mtime < older or not path.is_dir():
                continue
            shutil.rmtree(path)
            removed.append(name)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may be running on this machine (another user's does; a number
    no process can have counts as running: what it names is not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's; no such number
        return True
    return True
