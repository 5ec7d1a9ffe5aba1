"""The embedded store: the bucket layout as a directory tree a user can look at.

Bundles, manifests, shard lists, logs and outputs are files. Writes go to a temporary file beside
the target and are renamed into place, so readers never see half an object; ``create`` links the
finished temporary file to the key, which fails if the key exists: the local equivalent of GCS's
``if_generation_match=0``.

The store's own small records (``result.json`` commit markers, ``failed.json``, and each
attempt's ``status.json``) are rows of ``queue.db`` instead of files: a commit is one durable
SQLite write (and can share its transaction with the ack, see :mod:`worker.backends.local.ledger`),
and a record can never be confused with a file a task wrote. They read back through the same keys.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import heapq
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path

from worker.backends.local.db import Db
from worker.backends.local.files import (
    FILE_MODE,
    make_folders,
    os_error,
    unlink,
    walk,
)
from worker.backends.local.records import QUEUE_FILE, Records, is_record
from worker.errors import NotFound
from worker.store import Store

# Held (flock) around every read-change-write of :meth:`LocalStore.update`, by any process;
# named after the queue's file, so it is never listed as an object.
UPDATE_LOCK = QUEUE_FILE + "-update.lock"


class LocalStore(Store):
    def __init__(self, root: Path, *, db: Db | None = None):
        self.root = root.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(self.root, exc) from None
        self.records = Records(self.root, db)

    @property
    def db(self) -> Db:
        """The records' database, opened on first use (``runner runs`` in an empty folder
        creates nothing)."""
        return self.records.db

    def close(self) -> None:
        self.records.close()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad store key {key!r}")
        return self.root / key

    def url(self, key: str) -> str:
        return str(self._path(key))

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def _tempfile(self, path: Path) -> tuple[int, str]:
        """A temporary file beside ``path``, with the mode the user's umask gives a file."""
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:  # first object in its folder; rarer than not, so ask forgiveness
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, FILE_MODE)
        return fd, tmp

    def put(self, key: str, data: bytes) -> None:
        if is_record(key):
            self.records.put(key, data)
            return
        path = self._path(key)
        fd, tmp = self._tempfile(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            unlink(tmp)
            raise os_error(path, exc) from None
        except BaseException:
            unlink(tmp)
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
        except OSError as exc:
            unlink(tmp)
            raise os_error(target, exc) from None
        except BaseException:
            unlink(tmp)
            raise

    def create(self, key: str, data: bytes) -> bool:
        if is_record(key):
            return bool(self.records.create_many({key: data}))
        path = self._path(key)
        fd, tmp = self._tempfile(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            raise os_error(path, exc) from None
        finally:
            unlink(tmp)

    def update(self, key: str, change: Callable[[bytes], bytes | None]) -> bytes | None:
        """Read-change-write under a lock every process's updates of this store take (a
        ``runner cancel`` landing while a runner records a batch waits, then changes what
        the runner wrote, and neither is lost). Writers that only ``put`` do not wait."""
        with open(self.root / UPDATE_LOCK, "ab") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return super().update(key, change)

    def get_range(self, key: str, start: int, size: int) -> bytes:
        if is_record(key):
            return super().get_range(key, start, size)
        try:
            with self._path(key).open("rb") as fh:
                fh.seek(start)
                return fh.read(size)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def get(self, key: str) -> bytes:
        if is_record(key):
            data = self.records.get(key)
            if data is None:
                raise NotFound(f"no object {key}")
            return data
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Records in one query per 500 keys (a combine reads every shard's commit record)."""
        found = super().get_many([k for k in keys if not is_record(k)])
        found.update(self.records.get_many([k for k in keys if is_record(k)]))
        return found

    def get_file(self, key: str, path: Path) -> None:
        if is_record(key):
            Path(path).write_bytes(self.get(key))
            return
        try:
            shutil.copyfile(self._path(key), path)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def exists(self, key: str) -> bool:
        if is_record(key):
            return self.records.get(key) is not None
        return self._path(key).is_file()

    def list(
        self,
        prefix: str,
        *,
        suffix: str = "",
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[str]:
        keys = heapq.merge(
            self._list_files(prefix, suffix, start_after),
            self.records.scan(prefix, suffix, start_after),
        )
        for count, key in enumerate(keys):
            if limit is not None and count >= limit:
                return
            yield key

    def list_records(
        self,
        prefix: str,
        *,
        suffix: str = "",
        start_after: str | None = None,
        limit: int | None = None,
    ) -> Iterator[str]:
        """Like :meth:`list`, but only the store's own records (markers, attempt records):
        a range scan of their rows that never walks the run's logs and outputs."""
        keys = self.records.scan(prefix, suffix, start_after)
        return keys if limit is None else islice(keys, limit)

    def _list_files(self, prefix: str, suffix: str, start_after: str | None) -> Iterator[str]:
        # A prefix need not end at a folder boundary ("runs/r1" matches "runs/r1x/..." too).
        head, _, partial = prefix.rpartition("/")
        base = self._path(head) if head else self.root
        if not base.is_dir():
            return
        for key in walk(base, f"{head}/" if head else "", partial, suffix):
            if start_after is None or key > start_after:
                yield key

    def delete(self, key: str) -> None:
        if is_record(key):
            self.records.delete_many([key])
            return
        unlink(str(self._path(key)))

    # -- many at once: records in one transaction (one fsync), files hard-linked ---------------

    def create_many(self, objects: Mapping[str, bytes]) -> set[str]:
        rows = {k: v for k, v in objects.items() if is_record(k)}
        created = super().create_many({k: v for k, v in objects.items() if not is_record(k)})
        return created | (self.records.create_many(rows) if rows else set())

    def list_many(self, prefixes: Iterable[str]) -> dict[str, builtins.list[str]]:
        """The cache's index prefixes as range scans of the records (one connection)."""
        return {
            p: self.records.under(p) if p.startswith("cache/") else list(self.list(p))
            for p in prefixes
        }

    def copy(self, source: str, dest: str) -> None:
        """A hard link where the file system allows (outputs are sealed read-only, so the two
        names never differ), else a copy."""
        if is_record(source) or is_record(dest):
            self.put(dest, self.get(source))
            return
        make_folders(self.root, [str(self._path(dest).parent)])
        self._link(source, dest)

    def _link(self, source: str, dest: str) -> None:
        """:meth:`copy` into a folder that exists."""
        src, dst = self._path(source), self._path(dest)
        try:
            try:
                os.link(src, dst)
            except FileExistsError:  # left by a copy that did not finish: replaced
                dst.unlink()
                os.link(src, dst)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if not src.is_file():
                raise NotFound(f"no object {source}") from None
            raise
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise os_error(dst, exc) from None
            self.put_file(dest, src)

    def copy_many(self, pairs: Iterable[tuple[str, str]]) -> set[str]:
        """Each destination folder made once (``files.make_folders``), then a hard link per
        file, in this thread: the cross-run cache links thousands of shards' outputs at once,
        and threads took no less time (the folders' parents serialise their ``mkdir``)."""
        pairs = list(pairs)
        files = [(s, d) for s, d in pairs if not (is_record(s) or is_record(d))]
        missing = super().copy_many([(s, d) for s, d in pairs if is_record(s) or is_record(d)])
        make_folders(self.root, (str(self._path(d).parent) for _, d in files))
        for source, dest in files:
            try:
                self._link(source, dest)
            except NotFound:
                missing.add(source)
        return missing

    def delete_many(self, keys: Iterable[str]) -> None:
        rows = []
        for key in keys:
            if is_record(key):
                rows.append(key)
            else:
                self.delete(key)
        self.records.delete_many(rows)

    def usage(self, prefix: str) -> tuple[int, int]:
        sizes = [self._path(key).stat().st_size for key in self._list_files(prefix, "", None)]
        rows, held = self.records.usage(prefix)
        return len(sizes) + rows, sum(sizes) + held

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under a folder prefix (``runs/<run>/``), records included."""
        if not prefix.endswith("/"):
            raise ValueError(f"not a folder prefix: {prefix!r}")
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)
        self.records.delete_under(prefix)
