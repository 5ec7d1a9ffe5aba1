"""The embedded queue and event bus: one SQLite file, shared by every process on this machine.

Leases are visibility timeouts: a received message is hidden until ``available_at`` and comes back
by itself when a worker dies without acking (SIGKILL). A message delivered more than
``max_deliveries`` times moves to the dead-letter state instead of being delivered again.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

from worker import defaults
from worker.clock import SYSTEM_CLOCK, Clock
from worker.protocol import Event, WorkMessage
from worker.queue import Delivery, EventBus, QueueStats, WorkQueue

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    body TEXT NOT NULL,
    available_at REAL NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0,
    lease TEXT,
    dead INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (dead, available_at);
CREATE INDEX IF NOT EXISTS messages_run ON messages (run_id);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
"""


class _Db:
    """One connection per thread to the shared SQLite file, in WAL mode."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL survives a process crash; the store holds what must survive power loss.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _backoff(clock: Clock, deadline: float, waited: int) -> bool:
    """Sleep a little (growing to 100 ms) unless the deadline passed; False when it has."""
    remaining = deadline - clock.monotonic()
    if remaining <= 0:
        return False
    clock.sleep(min(0.005 * 2**waited, 0.1, remaining))
    return True


class LocalQueue(WorkQueue):
    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_deliveries: int = defaults.MAX_DELIVERIES,
    ):
        self._db = _Db(path)
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.max_deliveries = max_deliveries

    def publish(self, messages: Iterable[WorkMessage], *, delay: float = 0.0) -> int:
        count = 0
        it = iter(messages)
        while batch := list(islice(it, defaults.PUBLISH_BATCH)):
            at = self._clock.time() + delay
            rows = [(m.run_id, m.to_json().decode(), at) for m in batch]
            with self._db.transaction() as conn:
                conn.executemany(
                    "INSERT INTO messages (run_id, body, available_at) VALUES (?, ?, ?)", rows
                )
            count += len(rows)
        return count

    def receive(self, max_messages: int, timeout: float) -> list[Delivery]:
        deadline = self._clock.monotonic() + timeout
        waited = 0
        while True:
            got = self._receive_now(max_messages)
            if got or not _backoff(self._clock, deadline, waited):
                return got
            waited += 1

    def _receive_now(self, max_messages: int) -> list[Delivery]:
        now = self._clock.time()
        out: list[Delivery] = []
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, body, deliveries FROM messages WHERE dead = 0 AND available_at <= ?"
                " ORDER BY available_at, id LIMIT ?",
                (now, max_messages),
            ).fetchall()
            for row_id, body, deliveries in rows:
                if deliveries >= self.max_deliveries:
                    conn.execute(
                        "UPDATE messages SET dead = 1, lease = NULL WHERE id = ?", (row_id,)
                    )
                    continue
                lease = secrets.token_hex(8)
                conn.execute(
                    "UPDATE messages SET available_at = ?, deliveries = deliveries + 1, lease = ?"
                    " WHERE id = ?",
                    (now + self.lease_seconds, lease, row_id),
                )
                message = WorkMessage.from_json(body)
                out.append(Delivery(message, deliveries + 1, (row_id, lease)))
        return out

    def ack(self, delivery: Delivery) -> None:
        # By id alone: once a shard is committed or finally failed, no copy needs running again.
        row_id, _ = delivery.handle
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))

    def nack(self, delivery: Delivery) -> None:
        row_id, lease = delivery.handle
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE messages SET available_at = ?, lease = NULL WHERE id = ? AND lease = ?",
                (self._clock.time(), row_id, lease),
            )

    def extend(self, delivery: Delivery, seconds: float) -> None:
        row_id, lease = delivery.handle
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE messages SET available_at = ? WHERE id = ? AND lease = ?",
                (self._clock.time() + seconds, row_id, lease),
            )

    def dead_letters(self, max_messages: int = 100) -> list[WorkMessage]:
        with self._db.transaction() as conn:
            rows = conn.execute(
                "SELECT id, body FROM messages WHERE dead = 1 ORDER BY id LIMIT ?",
                (max_messages,),
            ).fetchall()
            conn.executemany("DELETE FROM messages WHERE id = ?", [(r[0],) for r in rows])
        return [WorkMessage.from_json(body) for _, body in rows]

    def purge(self, run_id: str) -> int:
        with self._db.transaction() as conn:
            cur = conn.execute(
                "DELETE FROM messages WHERE run_id = ? AND (lease IS NULL OR available_at <= ?)",
                (run_id, self._clock.time()),
            )
            return cur.rowcount

    def stats(self, run_id: str | None = None) -> QueueStats:
        now = self._clock.time()
        where, args = ("WHERE run_id = ?", (run_id,)) if run_id else ("", ())
        with self._db.transaction() as conn:
            queued, leased, dead = conn.execute(
                "SELECT"
                " COALESCE(SUM(dead = 0 AND (lease IS NULL OR available_at <= ?)), 0),"
                " COALESCE(SUM(dead = 0 AND lease IS NOT NULL AND available_at > ?), 0),"
                f" COALESCE(SUM(dead = 1), 0) FROM messages {where}",
                (now, now, *args),
            ).fetchone()
        return QueueStats(queued=queued, leased=leased, dead=dead)

    def close(self) -> None:
        self._db.close()


class LocalEvents(EventBus):
    """Events in the same SQLite file; each event is taken by one puller."""

    def __init__(self, path: Path, *, clock: Clock = SYSTEM_CLOCK):
        self._db = _Db(path)
        self._clock = clock

    def publish(self, event: Event) -> None:
        with self._db.transaction() as conn:
            conn.execute("INSERT INTO events (body) VALUES (?)", (event.to_json().decode(),))

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        deadline = self._clock.monotonic() + timeout
        waited = 0
        while True:
            with self._db.transaction() as conn:
                rows = conn.execute(
                    "SELECT id, body FROM events ORDER BY id LIMIT ?", (max_events,)
                ).fetchall()
                if rows:
                    conn.execute("DELETE FROM events WHERE id <= ?", (rows[-1][0],))
            if rows or not _backoff(self._clock, deadline, waited):
                return [Event.from_json(body) for _, body in rows]
            waited += 1

    def close(self) -> None:
        self._db.close()
