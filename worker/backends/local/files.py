"""Files of the embedded store: the mode it writes them with, its folders made a level at a
time, and the one line an out-of-space error becomes."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from worker.backends.local.records import QUEUE_FILE
from worker.errors import DiskFull


def _umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode of every file the store writes: what the user's umask gives any file they make
# (a temporary file is made 0600 and would otherwise keep that).
FILE_MODE = 0o666 & ~_umask()


def make_folders(root: Path, folders: Iterable[str]) -> None:
    """``mkdir -p`` of each folder under ``root``: top down from the nearest folder made or
    seen already, one ``mkdir`` per level and no ``stat`` (a folder per level is most of what
    linking a cached shard's outputs costs)."""
    made = {str(root)}
    for folder in sorted(set(folders)):
        missing = []
        at = folder
        while at not in made and os.path.dirname(at) != at:
            missing.append(at)
            at = os.path.dirname(at)
        for level in reversed(missing):
            try:
                os.mkdir(level)
            except FileExistsError:
                pass
            except OSError as exc:
                raise os_error(Path(level), exc) from None
            made.add(level)


def os_error(path: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"the disk holding {path.parent} is full; free some space, then"
            " `runner watch` or `runner retry --failed` goes on where the run stopped"
        )
    return exc


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def walk(folder: Path, key_prefix: str, partial: str, suffix: str) -> Iterator[str]:
    """The store's keys of the files under ``folder`` whose names start with ``partial`` and
    end in ``suffix``, in key order; temporary files and the queue's files left out."""
    try:
        # Sorted as keys sort: a folder's keys continue its name with "/".
        entries = sorted(
            os.scandir(folder),
            key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name,
        )
    except FileNotFoundError:
        return
    for entry in entries:
        if not entry.name.startswith(partial) or is_temp(entry.name):
            continue
        if entry.name == QUEUE_FILE or entry.name.startswith(QUEUE_FILE + "-"):
            continue
        key = key_prefix + entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from walk(Path(entry.path), key + "/", "", suffix)
        elif key.endswith(suffix):
            yield key
