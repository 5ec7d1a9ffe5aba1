"""A worker's scratch folder, held by one live worker at a time.

On the local backend every worker of a store keeps its slots' folders under
``<store>/scratch/<name>/`` (on the store's disk, so outputs are sealed by a rename), and each
attempt empties and removes folders there. Two live workers under one name would remove each
other's attempt folders under a running task (seen once: a shard failed with
``FileNotFoundError`` for its own working folder while another worker of the same name ended).
The runner never gives a name twice on purpose; this makes sure of it where it counts: a worker
takes ``<name>.lock`` beside its folder for its lifetime (an advisory ``flock``, which the
system lets go when the process ends, however it ends), and one that cannot does not start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class ScratchInUse(Exception):
    """Another live worker holds this scratch folder (the same name in the same store)."""


class ScratchLock:
    """The lock on one worker's scratch folder, taken with :meth:`take`, given back by
    :meth:`release` or the process's end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder.with_name(f"{folder.name}.lock")
        self._fd: int | None = None

    def take(self) -> None:
        """Hold the folder, or raise :class:`ScratchInUse` at once."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ScratchInUse(
                f"another live worker of this store is named {self.folder.name}: its scratch"
                f" folder {self.folder} is in use, so this one does not start"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
