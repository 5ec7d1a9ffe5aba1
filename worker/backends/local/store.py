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

import contextlib
import errno
import heapq
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

from worker.backends.local.db import Db
from worker.errors import DiskFull, NotFound
from worker.store import Store

QUEUE_FILE = "queue.db"

# Keys kept as rows: a shard's commit and failure markers and each attempt's record.
RECORD_KEY = re.compile(
    r"^runs/[^/]+/shards/[^/]+/(result\.json|failed\.json|attempts/\d+/status\.json)$"
)


def is_record(key: str) -> bool:
    return RECORD_KEY.match(key) is not None


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


class LocalStore(Store):
    def __init__(self, root: Path, *, db: Db | None = None):
        self.root = root.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _os_error(self.root, exc) from None
        self._db_arg = db
        self._db: Db | None = db

    @property
    def db(self) -> Db:
        """The records' database, opened on first use (``runner runs`` in an empty folder
        creates nothing)."""
        if self._db is None:
            self._db = Db(self.root / QUEUE_FILE, durable=True)
        return self._db

    def _has_db(self) -> bool:
        return self._db is not None or (self.root / QUEUE_FILE).exists()

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
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT OR REPLACE INTO records (key, data) VALUES (?, ?)", (key, data)
                )
            return
        path = self._path(key)
        fd, tmp = self._tempfile(path)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            _unlink(tmp)
            raise _os_error(path, exc) from None
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
        except OSError as exc:
            _unlink(tmp)
            raise _os_error(target, exc) from None
        except BaseException:
            _unlink(tmp)
            raise

    def create(self, key: str, data: bytes) -> bool:
        if is_record(key):
            with self.db.transaction() as conn:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO records (key, data) VALUES (?, ?)", (key, data)
                )
                return cur.rowcount == 1
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
            raise _os_error(path, exc) from None
        finally:
            _unlink(tmp)

    def _record(self, key: str) -> bytes | None:
        if not self._has_db():
            return None
        row = self.db.conn().execute("SELECT data FROM records WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def get(self, key: str) -> bytes:
        if is_record(key):
            data = self._record(key)
            if data is None:
                raise NotFound(f"no object {key}")
            return data
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """Records in one query per 500 keys (a combine reads every shard's commit record)."""
        records = [k for k in keys if is_record(k)]
        found = super().get_many([k for k in keys if not is_record(k)])
        if not records or not self._has_db():
            return found
        conn = self.db.conn()
        for i in range(0, len(records), 500):
            chunk = records[i : i + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, data FROM records WHERE key IN ({marks})"
            found.update((key, bytes(data)) for key, data in conn.execute(query, chunk))
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
            return self._record(key) is not None
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
            self._list_records(prefix, suffix, start_after),
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
        keys = self._list_records(prefix, suffix, start_after)
        return keys if limit is None else islice(keys, limit)

    def _list_records(self, prefix: str, suffix: str, start_after: str | None) -> Iterator[str]:
        if not self._has_db() or not _may_hold_records(prefix):
            return
        low = max(prefix, start_after or "")
        conn = self.db.conn()
        last = low
        op = ">" if start_after is not None and low == start_after else ">="
        while True:  # in pages, so a lazy reader does not hold a read transaction open
            rows = conn.execute(
                f"SELECT key FROM records WHERE key {op} ? ORDER BY key LIMIT 1000", (last,)
            ).fetchall()
            if not rows:
                return
            for (key,) in rows:
                if not key.startswith(prefix):
                    return
                if key.endswith(suffix):
                    yield key
            last, op = rows[-1][0], ">"

    def _list_files(self, prefix: str, suffix: str, start_after: str | None) -> Iterator[str]:
        # A prefix need not end at a folder boundary ("runs/r1" matches "runs/r1x/..." too).
        head, _, partial = prefix.rpartition("/")
        base = self._path(head) if head else self.root
        if not base.is_dir():
            return
        for key in self._walk(base, f"{head}/" if head else "", partial, suffix):
            if start_after is None or key > start_after:
                yield key

    def _walk(self, folder: Path, key_prefix: str, partial: str, suffix: str) -> Iterator[str]:
        try:
            # Sorted as keys sort: a folder's keys continue its name with "/".
            entries = sorted(
                os.scandir(folder),
                key=lambda e: e.name + "/" if e.is_dir(follow_symlinks=False) else e.name,
            )
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.name.startswith(partial) or _is_temp(entry.name):
                continue
            if entry.name == QUEUE_FILE or entry.name.startswith(QUEUE_FILE + "-"):
                continue
            key = key_prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), key + "/", "", suffix)
            elif key.endswith(suffix):
                yield key

    def delete(self, key: str) -> None:
        if is_record(key):
            if self._has_db():
                with self.db.transaction() as conn:
                    conn.execute("DELETE FROM records WHERE key = ?", (key,))
            return
        _unlink(str(self._path(key)))

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under a folder prefix (``runs/<run>/``), records included."""
        if not prefix.endswith("/"):
            raise ValueError(f"not a folder prefix: {prefix!r}")
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)
        if self._has_db():
            with self.db.transaction() as conn:
                conn.execute(
                    "DELETE FROM records WHERE key >= ? AND key < ?", (prefix, prefix[:-1] + "0")
                )


def _may_hold_records(prefix: str) -> bool:
    return "runs/".startswith(prefix) or prefix.startswith("runs/")


def _os_error(path: Path, exc: OSError) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(
            f"the disk holding {path.parent} is full; free some space, then"
            " `runner watch` or `runner retry --failed` goes on where the run stopped"
        )
    return exc


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
