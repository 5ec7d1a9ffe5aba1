"""The embedded backend's ledger: claims and whole batches of settlements as SQLite transactions.

The queue's messages, the events and the store's records live in one file (``queue.db``), so a
batch of finished attempts is committed, recorded, re-queued, acked and announced in a single
transaction, made durable with one fsync (``synchronous=FULL``) before it returns. A crash
before it returns loses none of it: the messages are still leased and run again. A batch that
leaves a run with no message rings the run's bell (:mod:`worker.backends.local.bell`): its
runner sees the end at once.
"""

from __future__ import annotations

import sqlite3

from worker.backends.local.bell import ring
from worker.backends.local.events import INSERT_EVENT, event_row
from worker.backends.local.queue import INSERT_MESSAGE, message_row
from worker.backends.local.store import LocalStore
from worker.ledger import Finished, Ledger, Ops, running_record, settle_one, started_event
from worker.protocol import Event, Layout, WorkMessage
from worker.queue import Delivery

# Whether a run has a message left (queued, leased or in backoff; acked ones are gone).
_ANY_LEFT = "SELECT 1 FROM messages WHERE run_id = ? AND dead = 0 LIMIT 1"


class _SqlOps(Ops):
    def __init__(self, conn: sqlite3.Connection, now: float):
        self.conn = conn
        self.now = now

    def create(self, key: str, data: bytes) -> bool:
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO records (key, data) VALUES (?, ?)", (key, data)
        )
        return cur.rowcount == 1

    def put(self, key: str, data: bytes) -> None:
        self.conn.execute("INSERT OR REPLACE INTO records (key, data) VALUES (?, ?)", (key, data))

    def publish(self, message: WorkMessage) -> None:
        self.conn.execute(INSERT_MESSAGE, message_row(message, self.now))

    def ack(self, delivery: Delivery) -> None:
        self.conn.execute("DELETE FROM messages WHERE id = ?", (delivery.handle[0],))

    def requeue(self, delivery: Delivery, message: WorkMessage) -> None:
        row_id, lease = delivery.handle
        self.conn.execute(
            "UPDATE messages SET body = ?, deliveries = 0, available_at = 0, lease = NULL,"
            " worker = NULL WHERE id = ? AND lease = ?",
            (message.to_json().decode(), row_id, lease),
        )

    def emit(self, event: Event) -> None:
        self.conn.execute(INSERT_EVENT, event_row(event))


class LocalLedger(Ledger):
    batches = True

    def claim_many(
        self, items: list[tuple[str, str, int, str | None]], *, worker: str
    ) -> list[tuple[int, float]]:
        # Claims need not survive a power cut (a lost one only reuses its number), so they go
        # through the queue's connection, which does not fsync; a batch is one transaction.
        db = self.queue.db  # type: ignore[attr-defined]
        started = self.clock.time()
        out: list[tuple[int, float]] = []
        with db.transaction() as conn:
            for run_id, shard_id, hint, bundle in items:
                attempt = max(hint, 1)
                while True:
                    record = running_record(run_id, shard_id, attempt, worker, started, bundle)
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO records (key, data) VALUES (?, ?)",
                        (Layout.status(run_id, shard_id, attempt), record),
                    )
                    if cur.rowcount == 1:
                        break
                    attempt += 1
                event = started_event(run_id, shard_id, attempt, worker, started)
                conn.execute(INSERT_EVENT, event_row(event))
                out.append((attempt, started))
        return out

    def claim(
        self, run_id: str, shard_id: str, hint: int, *, worker: str, bundle: str | None
    ) -> tuple[int, float]:
        ((attempt, started),) = self.claim_many([(run_id, shard_id, hint, bundle)], worker=worker)
        return attempt, started

    def settle(self, batch: list[Finished]) -> None:
        if not batch:
            return
        store = self.store
        assert isinstance(store, LocalStore)
        with store.db.transaction() as conn:
            ops = _SqlOps(conn, self.clock.time())
            for f in batch:
                settle_one(ops, f)
            run_ids = {f.delivery.message.run_id for f in batch}
            drained = [r for r in run_ids if not conn.execute(_ANY_LEFT, (r,)).fetchone()]
        ring(store.root, drained)  # nothing of theirs left queued or running: may be over

    def extend(self, deliveries: list[Delivery], seconds: float) -> None:
        self.queue.extend_many(deliveries, seconds)  # type: ignore[attr-defined]
