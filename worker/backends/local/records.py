"""The embedded store's own small records as rows of ``queue.db``: commit and failure markers,
attempt records and the cross-run cache's index entries (:func:`is_record` says which keys).

A commit is one durable SQLite write, which can share its transaction with the ack
(:mod:`worker.backends.local.ledger`), and a record is never confused with a file a task wrote.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from worker.backends.local.db import Db

QUEUE_FILE = "queue.db"

# Keys kept as rows: a shard's commit and failure markers, each attempt's record, and the
# cross-run cache's index entries (``cache/<key>/<run>/<shard>``, runner.engine.cache).
RECORD_KEY = re.compile(
    r"^(runs/[^/]+/shards/[^/]+/(result\.json|failed\.json|attempts/\d+/status\.json)"
    r"|cache/[^/]+/[^/]+/[^/]+)$"
)
_END = "\U0010ffff"  # sorts after every key that continues a prefix


def is_record(key: str) -> bool:
    return RECORD_KEY.match(key) is not None


def may_hold_records(prefix: str) -> bool:
    return any(top.startswith(prefix) or prefix.startswith(top) for top in ("runs/", "cache/"))


class Records:
    """The rows of one store's ``queue.db``, opened on first write (``runner runs`` in an
    empty folder creates nothing); reads of a store with no database find nothing."""

    def __init__(self, root: Path, db: Db | None = None):
        self.root = root
        self._db = db

    @property
    def db(self) -> Db:
        if self._db is None:
            self._db = Db(self.root / QUEUE_FILE, durable=True)
        return self._db

    def close(self) -> None:
        """Close this thread's connection, if one is open (the next use opens one again)."""
        if self._db is not None:
            self._db.close()

    def opened(self) -> bool:
        """Whether the database exists (nothing to read otherwise)."""
        return self._db is not None or (self.root / QUEUE_FILE).exists()

    def get(self, key: str) -> bytes | None:
        if not self.opened():
            return None
        row = self.db.conn().execute("SELECT data FROM records WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])

    def put(self, key: str, data: bytes) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO records (key, data) VALUES (?, ?)", (key, data))

    def create_many(self, rows: Mapping[str, bytes]) -> set[str]:
        """Each row unless its key exists, in one transaction; the keys created."""
        created = set()
        with self.db.transaction() as conn:
            for key, data in rows.items():
                cur = conn.execute(
                    "INSERT OR IGNORE INTO records (key, data) VALUES (?, ?)", (key, data)
                )
                if cur.rowcount == 1:
                    created.add(key)
        return created

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """One query per 500 keys (a combine reads every shard's commit record)."""
        found: dict[str, bytes] = {}
        if not keys or not self.opened():
            return found
        conn = self.db.conn()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, data FROM records WHERE key IN ({marks})"
            found.update((key, bytes(data)) for key, data in conn.execute(query, chunk))
        return found

    def scan(self, prefix: str, suffix: str, start_after: str | None) -> Iterator[str]:
        """Keys under ``prefix`` ending in ``suffix`` (after ``start_after``), in order."""
        if not self.opened() or not may_hold_records(prefix):
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

    def under(self, prefix: str) -> list[str]:
        """Every key under ``prefix`` at once (a range scan of one connection)."""
        if not self.opened():
            return []
        rows = self.db.conn().execute(
            "SELECT key FROM records WHERE key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + _END),
        )
        return [key for (key,) in rows]

    def delete_many(self, keys: Iterable[str]) -> None:
        rows = [(key,) for key in keys]
        if rows and self.opened():
            with self.db.transaction() as conn:
                conn.executemany("DELETE FROM records WHERE key = ?", rows)

    def usage(self, prefix: str) -> tuple[int, int]:
        """How many rows lie under ``prefix`` and their bytes."""
        if not self.opened() or not may_hold_records(prefix):
            return 0, 0
        query = "SELECT COUNT(*), TOTAL(LENGTH(data)) FROM records WHERE key >= ? AND key < ?"
        rows, held = self.db.conn().execute(query, (prefix, prefix + _END)).fetchone()
        return int(rows), int(held)

    def delete_under(self, folder: str) -> None:
        """Every row under a folder prefix (``runs/<run>/``)."""
        if self.opened():
            with self.db.transaction() as conn:
                conn.execute(
                    "DELETE FROM records WHERE key >= ? AND key < ?", (folder, folder[:-1] + "0")
                )
