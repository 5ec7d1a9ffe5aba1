"""The worker's cache of unpacked bundles: one copy per bundle, shared by the workers of a
machine, held while used and swept once unused for :data:`KEEP_SECONDS`.

Each entry of the cache folder (``/tmp/cflow/bundles`` unless ``CFLOW_SCRATCH`` says where)
is a task folder unpacked (``<sha256>/``) or a task's ``requirements.txt`` installed
(``deps-<digest>/``), with a lock file beside it (``<name>.lock``):

- a worker using an entry holds its lock shared for as long as it may run the task (its
  lifetime: the lock goes with its last descriptor, also when it is killed), and sets the lock
  file's time to now; one that finds the entry not whole (new, or removed by hand) makes it
  while holding it, under a second lock (``<name>.make``) taken exclusively by makers alone,
  so that no maker ever waits for the workers holding an entry;
- whoever makes a new entry then sweeps (for at most :data:`SWEEP_SECONDS`): every entry
  whose lock file is older than :data:`KEEP_SECONDS` and that it can lock exclusively without
  waiting (nobody holds it) is removed, its ``.complete`` mark first (a sweep cut short
  leaves an entry made again, never one half there that looks whole), then its folder, then
  its lock file.

A lock file removed while a process was opening it is one nobody else will lock: so each lock
taken is checked to be the file still at its path, and taken again where not. A sweep looks
only at the lock files of entries (a ``..lock`` is not one, and the folder above is never
touched); one that cannot remove an entry logs it and goes on. An entry that does not fit on a
full disk is tried once more after a sweep. The cache folder and the folder it is in must be
this user's (:func:`own_folder`): code another user unpacked there would run as one's own.

Without a sweep, every version of a task and every function a notebook mapped stayed unpacked
for ever (14,000 entries, 1.6 GB, in ``/tmp`` here, which on many machines is memory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import logging
import os
import re
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

from worker.bundle import REQUIREMENTS, UnpackedBundle, extract_safely
from worker.errors import TaskError
from worker.executors.base import remove_tree

logger = logging.getLogger("cflow.worker")

KEEP_SECONDS = 3600.0  # an entry nobody has used for this long is removed by the next sweep
KEEP_ENV = "CFLOW_BUNDLE_KEEP_SECONDS"  # another such time
# A sweep stops after about this long, the next one going on: a cache of thousands of entries
# (one never swept) holds back no run by more (removing 6,400 entries took 4.6 s here).
SWEEP_SECONDS = 0.25
COMPLETE = ".complete"  # in an entry made whole
_ENTRY_LOCK = re.compile(r"^(?:[0-9a-f]{64}|deps-[0-9a-f]{16})\.lock$")  # what a sweep looks at


def keep_seconds() -> float:
    """:data:`KEEP_SECONDS`, or ``CFLOW_BUNDLE_KEEP_SECONDS`` where set to a number >= 0."""
    try:
        seconds = float(os.environ.get(KEEP_ENV, ""))
    except ValueError:
        return KEEP_SECONDS
    return seconds if seconds >= 0 else KEEP_SECONDS


class BundleCache:
    """The unpacked bundles under ``folder``, each held from its first use until
    :meth:`release` (or this process's end)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._held: dict[str, list[int]] = {}  # bundle -> descriptors of its locks held
        self._owned = False  # the folder checked to be this user's

    def unpack(self, data: bytes, sha256: str, *, install: bool = True) -> UnpackedBundle:
        """Bundle ``sha256`` (``data``, verified) unpacked once into ``folder/<sha256>``, with
        its requirements installed (``install``); held until :meth:`release`.

        Raises:
            TaskError: the bundle is corrupt, unsafe to unpack, or its requirements fail; the
                folder is another user's (:func:`own_folder`).
        """
        if not self._owned:
            own_folder(self.folder)
            self._owned = True
        made, fd = _unpacked(data, sha256, self.folder)
        held = self._held.setdefault(sha256, [])
        held.append(fd)
        deps = None
        if install:
            deps, deps_fd, installed = _installed(self.folder / sha256, self.folder)
            if deps_fd is not None:
                held.append(deps_fd)
            made = made or installed
        if made:
            sweep(self.folder)
        return UnpackedBundle(sha256, self.folder / sha256, deps)

    def release(self, sha256: str | None = None) -> None:
        """Stop holding bundle ``sha256`` (and its requirements), or every one: the next
        sweep may remove what nobody else holds."""
        shas = list(self._held) if sha256 is None else [sha256]
        for sha in shas:
            for fd in self._held.pop(sha, []):
                with contextlib.suppress(OSError):
                    os.utime(fd)  # its hour runs from its last holder's end, not its first use
                # Unlocked, not only closed: a task host forked since shares the descriptor,
                # and would hold the lock for as long as it lives.
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def unpack(data: bytes, sha256: str, cache: Path, *, install: bool = True) -> UnpackedBundle:
    """Bundle ``sha256`` unpacked once into ``cache/<sha256>`` (and with ``install`` its
    requirements installed), not held: for a folder of one's own (a combine's)."""
    cache_ = BundleCache(cache)
    try:
        return cache_.unpack(data, sha256, install=install)
    finally:
        cache_.release()


def install_requirements(task_root: Path, cache: Path) -> Path | None:
    """The task's ``requirements.txt`` pip-installed once per distinct content into
    ``cache/deps-<digest>`` (None where it names nothing), not held."""
    deps, fd, _ = _installed(task_root, cache)
    if fd is not None:
        os.close(fd)
    return deps


def _unpacked(data: bytes, sha256: str, cache: Path) -> tuple[bool, int]:
    """Whether this call unpacked the bundle (it was not there), and its lock held shared."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise TaskError(f"task bundle {sha256[:12]} is corrupt (its sha256 is {actual[:12]})")
    target = cache / sha256

    def make() -> None:
        tmp = cache / f"{sha256}.partial"
        remove_tree(tmp)
        try:
            tmp.mkdir()
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
                extract_safely(tar, tmp)
            (tmp / COMPLETE).touch()
        except BaseException:
            remove_tree(tmp)  # a full disk is not left fuller
            raise
        remove_tree(target)
        tmp.rename(target)

    return _held(cache / f"{sha256}.lock", target, make)


def _installed(task_root: Path, cache: Path) -> tuple[Path | None, int | None, bool]:
    """Where the task's requirements are installed (None where it names none), the lock of
    that entry held shared, and whether this call installed them."""
    req = task_root / REQUIREMENTS
    if not req.is_file() or not _has_requirements(req.read_text()):
        return None, None, False
    digest = hashlib.sha256(req.read_bytes()).hexdigest()[:16]
    deps = cache / f"deps-{digest}"

    def make() -> None:
        remove_tree(deps)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--target",
                str(deps),
                "-r",
                str(req),
            ],
            cwd=task_root,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TaskError(f"installing the task's requirements.txt failed: {tail[0]}")
        (deps / COMPLETE).touch()

    made, fd = _held(cache / f"deps-{digest}.lock", deps, make)
    return deps, fd, made


def _has_requirements(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines())


def _held(lock: Path, entry: Path, make: Callable[[], None]) -> tuple[bool, int]:
    """Entry ``entry`` held (``lock`` shared, its time set to now), made first where it is not
    whole (``make``, by one process at a time: the ``.make`` lock beside it, which never waits
    for those holding the entry): whether it was made, and the lock's descriptor (the
    caller's to close)."""
    fd = _lock(lock, fcntl.LOCK_SH)  # from now on no sweep removes it
    made = False
    try:
        if not (entry / COMPLETE).exists():
            making = lock.with_suffix(".make")
            maker = _lock(making, fcntl.LOCK_EX)
            try:
                if not (entry / COMPLETE).exists():  # another maker's meanwhile
                    _make(make, lock.parent)
                    made = True
            finally:
                making.unlink(missing_ok=True)  # one waiting for it takes a new one (_lock)
                os.close(maker)
        os.utime(fd)  # used now: no sweep removes it for KEEP_SECONDS after its last holder
    except BaseException:
        os.close(fd)
        raise
    return made, fd


def _make(make: Callable[[], None], cache: Path) -> None:
    """``make()``; where the disk is full, once more after a sweep that freed something (the
    sweep otherwise runs only after an entry is made, which a full disk never lets happen)."""
    try:
        make()
    except OSError as exc:
        if exc.errno != errno.ENOSPC or not sweep(cache):
            raise
        make()


def own_folder(folder: Path) -> None:
    """Make ``folder`` where missing, and check that it and the folder it is in are this
    user's, taking off any group or other write bit: the default, ``/tmp/cflow/bundles``, is
    in a folder every user may write to, and code unpacked there by someone else would be run
    as one's own.

    Raises:
        TaskError: one of them, or a link to it, belongs to another user.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    uid = os.getuid()
    for path in (folder.parent, folder):
        link, info = os.lstat(path), os.stat(path)
        owner = link.st_uid if stat.S_ISLNK(link.st_mode) and link.st_uid != uid else info.st_uid
        if owner != uid:
            raise TaskError(
                f"{path} belongs to another user (uid {owner}), who could put code in it that"
                " would run as yours: set CFLOW_SCRATCH to a folder of your own"
            )
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))


def _lock(path: Path, how: int) -> int:
    """``path`` opened (made where missing) and locked ``how``: the file at ``path`` when
    the lock was granted (one a sweep removed meanwhile is let go, and the new one locked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, how)
        except BaseException:
            os.close(fd)
            raise
        if _still(fd, path):
            return fd
        os.close(fd)


def _still(fd: int, path: Path) -> bool:
    """The file open as ``fd`` is the one at ``path`` (no sweep removed it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def sweep(cache: Path, keep: float | None = None, budget: float = SWEEP_SECONDS) -> list[str]:
    """Remove every entry of ``cache`` unused for ``keep`` seconds (:func:`keep_seconds`)
    that nobody holds, for at most about ``budget`` seconds (the next sweep goes on); the names
    removed (a bundle's hash, ``deps-<digest>``)."""
    keep = keep_seconds() if keep is None else keep
    now, removed = time.time(), list[str]()
    try:
        names = os.listdir(cache)
    except FileNotFoundError:
        return removed
    deadline = time.monotonic() + budget
    for name in names:
        if not _ENTRY_LOCK.match(name):  # never ".lock" itself, nor "..lock": the folder above
            continue
        if time.monotonic() > deadline:
            break
        lock, entry = cache / name, name.removesuffix(".lock")
        try:
            if _unused(now - os.stat(lock).st_mtime, keep) and _remove(cache, entry, lock, keep):
                removed.append(entry)
        except FileNotFoundError:
            continue  # another sweep's meanwhile
        except OSError as exc:  # another user's, say: never the run's failure
            logger.warning("could not remove the unpacked bundle %s: %s", entry, exc)
    if removed:
        logger.info("removed %d unpacked task bundles unused for %gs", len(removed), keep)
    return removed


def _unused(age: float, keep: float) -> bool:
    """Unused for ``keep`` seconds: ``age`` seconds since its last use; one that far in the
    future (a clock set back since) counts as old too, or it would stay for as long."""
    return age >= keep or age < -keep


def _remove(cache: Path, entry: str, lock: Path, keep: float) -> bool:
    """Entry ``entry`` removed if nobody holds it and it is unused for ``keep`` seconds."""
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # held: in use
        if not _still(fd, lock) or not _unused(time.time() - os.fstat(fd).st_mtime, keep):
            return False  # removed and made again, or used, meanwhile
        folder = cache / entry
        if os.path.isdir(folder) and not os.path.islink(folder):
            os.chmod(folder, 0o700)  # a worker took its write bits off (pool.read_only)
            # No longer whole, before anything else of it goes.
            (folder / COMPLETE).unlink(missing_ok=True)
        remove_tree(folder)
        remove_tree(cache / f"{entry}.partial")
        (cache / f"{entry}.make").unlink(missing_ok=True)  # no maker: each holds the lock
        lock.unlink()
        return True
    finally:
        os.close(fd)
