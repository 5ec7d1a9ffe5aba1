"""The embedded backend's SQLite file (``queue.db``): one connection per thread, WAL mode.

The local queue, event bus and the store's records (commit markers, failure markers, attempt
records) share this one file, so a worker can settle a shard (commit, ack, event) in a single
durable transaction.
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from worker import defaults
from worker.errors import BackendError, DiskFull

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    shard_id TEXT NOT NULL DEFAULT '',
    body TEXT NOT NULL,
    available_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease TEXT,
    worker TEXT,
    dead INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (dead, available_at);
CREATE INDEX IF NOT EXISTS messages_run ON messages (run_id, shard_id);
CREATE INDEX IF NOT EXISTS messages_run_ready ON messages (run_id, dead, available_at);
CREATE INDEX IF NOT EXISTS messages_worker ON messages (worker);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    run_id TEXT,
    at REAL NOT NULL DEFAULT 0,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events (run_id, id);
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS records (key TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fences (worker TEXT PRIMARY KEY, at REAL NOT NULL) WITHOUT ROWID;
"""


class _Connection(sqlite3.Connection):
    """A connection this process can find again (weakly) to close it before it forks."""

    closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


_OPEN: weakref.WeakSet[_Connection] = weakref.WeakSet()  # this process's, to any store file

DISK_FULL_BYTES = 1 << 20  # free space below which an I/O error is taken for a full disk
BUSY_TIMEOUT = 30.0  # seconds a writer waits for another's transaction (SQLite's own handler)
# A writer first waits for another's transaction in steps of its own, growing from 0.1 ms to
# 1 ms, for up to this long; then SQLite's handler waits the rest of BUSY_TIMEOUT. SQLite's
# sleeps 1, 2, 5, 10 ms between its tries: a write behind another's millisecond commit (a
# worker's settlement, fsynced) waited 3 ms or more, on every step of a short run.
QUICK_BUSY = 0.1


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    if "full" in str(exc):
        return True
    # A WAL that cannot grow on a full disk (tmpfs, for one) comes back as a plain I/O error.
    return path is not None and "disk I/O error" in str(exc) and _nearly_full(path)


def _nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path.parent).free < DISK_FULL_BYTES
    except OSError:
        return False


class Db:
    """One connection per thread to the shared SQLite file.

    ``durable``: every commit reaches the disk before it returns (``synchronous=FULL``), for
    the connection that writes commit markers; the queue alone may lose its last transactions to
    a power cut (a lost ack only redelivers).
    """

    def __init__(self, path: Path, *, durable: bool = False):
        self.path = path
        self.durable = durable
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():  # a new store says it is one before anything else is in it
            (path.parent / defaults.STORE_MARK).touch()
        self._local = threading.local()
        conn = self.conn()
        try:
            # A file this schema has been applied to says so in its user_version (one read,
            # where creating every table and index "if not exists" again is a dozen writes'
            # parsing); a file of another version, or a new one, is brought up to it.
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                self._bring_up()
        except sqlite3.Error as exc:
            raise _backend_error(path, exc) from None

    def _bring_up(self) -> None:
        """Apply the schema in one transaction: half the time of a commit per statement on a
        new file, and a process opening the file at the same moment waits for it whole."""
        with self.transaction() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                _migrate(conn)
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def conn(self) -> sqlite3.Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None or conn.closed:  # closed before a fork: open again
            try:
                # Used by this thread alone; another may close it once this one is gone.
                conn = sqlite3.connect(
                    self.path,
                    timeout=BUSY_TIMEOUT,
                    isolation_level=None,
                    check_same_thread=False,
                    factory=_Connection,
                )
                _OPEN.add(conn)
                _write_ahead(conn)
                conn.execute(f"PRAGMA synchronous={'FULL' if self.durable else 'NORMAL'}")
            except sqlite3.Error as exc:
                raise _backend_error(self.path, exc) from None
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self.conn()
        try:
            _begin(conn)
        except sqlite3.Error as exc:
            raise _backend_error(self.path, exc) from None
        try:
            yield conn
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _backend_error(self.path, exc) from None
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise _backend_error(self.path, exc) from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _write_ahead(conn: sqlite3.Connection) -> None:
    """The file in write-ahead-log mode. A new file another process is making that moment
    answers "database is locked" at once (SQLite does not wait for that lock), so it is asked
    again in short steps, growing from 1 ms to 50 ms, for up to :data:`BUSY_TIMEOUT`: six
    processes opening one new store at once failed about one open in thirty without."""
    if not _while_busy(conn, "PRAGMA journal_mode=WAL", BUSY_TIMEOUT, 0.001, 0.05):
        conn.execute("PRAGMA journal_mode=WAL")  # still busy: raised here


def _begin(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``: the write lock, waited for in short steps first (:data:`QUICK_BUSY`)."""
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        if _while_busy(conn, "BEGIN IMMEDIATE", QUICK_BUSY, 0.0001, 0.001):
            return
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    conn.execute("BEGIN IMMEDIATE")  # still busy (or another error, raised again here)


def _while_busy(
    conn: sqlite3.Connection, statement: str, seconds: float, first: float, most: float
) -> bool:
    """Run ``statement`` again while SQLite answers busy, pausing ``first`` seconds, doubling
    to ``most``, for up to ``seconds``; True once it ran, False when still busy then (an error
    that is not busy: False at once, for the caller's own try to raise)."""
    deadline = time.monotonic() + seconds
    pause = first
    while True:
        try:
            conn.execute(statement)
            return True
        except sqlite3.OperationalError as exc:
            busy = exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # or an extended one
            if not busy or time.monotonic() >= deadline:
                return False
        time.sleep(pause)
        pause = min(pause * 2, most)


def close_before_fork() -> None:
    """Close every connection this process has open to a store file, also those of threads
    that have ended and not yet been collected (each opens again on its next use); for a
    process with one thread, before it forks.

    SQLite keeps one record per open file and process (its locks, its descriptors, the
    write-ahead log's shared-memory map) that every connection to the file shares. A forked
    child inherits that record but none of the locks: a connection the child then opens to the
    same file joins it, skips the locking it believes done and works through descriptors that
    are not its own (SQLite's "How To Corrupt An SQLite Database File", section 2.6). With
    nothing open at the fork, the child starts clean.
    """
    for conn in list(_OPEN):
        conn.close()


_ADDED_COLUMNS = {  # columns newer than a store's first version: table -> (column, declaration)
    "messages": [("shard_id", "TEXT NOT NULL DEFAULT ''"), ("worker", "TEXT")],
    "events": [("run_id", "TEXT"), ("at", "REAL NOT NULL DEFAULT 0")],
}


def _schema_version() -> int:
    """The schema's own number, from its text: any change to it (or to the added columns)
    is a new version, and every file of an older one is migrated once when next opened."""
    text = SCHEMA + repr(sorted(_ADDED_COLUMNS.items()))
    return zlib.crc32(text.encode()) & 0x7FFFFFFF or 1


SCHEMA_VERSION = _schema_version()


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store made by an older version up to this schema (columns only ever added)."""
    for table, columns in _ADDED_COLUMNS.items():
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if not have:
            continue  # a new file: the schema creates it whole
        for name, declaration in columns:
            if name not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")


def _backend_error(path: Path, exc: sqlite3.Error) -> BackendError:
    if is_disk_full(exc, path):
        return DiskFull(
            f"the disk holding {path.parent} is full ({exc}); free some space, then"
            " `runner watch` or `runner retry --failed` goes on where the run stopped"
        )
    return BackendError(f"{path}: {exc}")
