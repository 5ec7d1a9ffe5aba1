"""The embedded store: the bucket layout as a directory tree a user can look at.

Writes go to a temporary file beside the target and are renamed into place, so readers never see
half an object. ``create`` links the finished temporary file to the key, which fails if the key
exists: the local equivalent of GCS's ``if_generation_match=0``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from worker.errors import NotFound
from worker.store import Store

# Commit markers are flushed to disk before they appear: a committed shard survives a crash of
# the machine. Other create-only objects (attempt claims) are not: a claim lost to a power cut
# only means its attempt number is used again.
DURABLE_SUFFIXES = ("/result.json",)


class LocalStore(Store):
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad store key {key!r}")
        return self.root / key

    def url(self, key: str) -> str:
        return str(self._path(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _tempfile(self, path: Path) -> tuple[int, str]:
        try:
            return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:  # first object in its folder; rarer than not, so ask forgiveness
            path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        fd, tmp = self._tempfile(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise

    def put_file(self, key: str, path: Path) -> None:
        target = self._path(key)
        if target == Path(path).resolve():
            return
        fd, tmp = self._tempfile(target)
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        except BaseException:
            _unlink(tmp)
            raise

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        fd, tmp = self._tempfile(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                if key.endswith(DURABLE_SUFFIXES):
                    fh.flush()
                    os.fsync(fh.fileno())
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str, *, suffix: str = "") -> Iterator[str]:
        # A prefix need not end at a folder boundary ("runs/r1" matches "runs/r1x/..." too).
        head, _, partial = prefix.rpartition("/")
        base = self._path(head) if head else self.root
        if not base.is_dir():
            return
        yield from self._walk(base, f"{head}/" if head else "", partial, suffix)

    def _walk(self, folder: Path, key_prefix: str, partial: str, suffix: str) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.startswith(partial) or _is_temp(entry.name):
                continue
            key = key_prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key + "/", "", suffix)
            elif key.endswith(suffix):
                yield key

    def delete(self, key: str) -> None:
        _unlink(str(self._path(key)))


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
