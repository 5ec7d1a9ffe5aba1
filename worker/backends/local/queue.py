"""The embedded queue: one SQLite file, shared by every process on this machine.

Leases are visibility timeouts: a received message is hidden until ``available_at`` and comes back
by itself when a worker dies without acking (SIGKILL), or at once when the local fleet sees the
process die (:meth:`FleetLeases.release`). A message delivered more than ``max_deliveries``
times moves to the dead-letter state instead of being delivered again; a preemption is not a
delivery (:meth:`LocalQueue.requeue` starts the count over and puts the shard at the front).

A worker about to be stopped is fenced first (:meth:`FleetLeases.fence`, in
:mod:`worker.backends.local.fleet_leases`): in one transaction the fence is set where the
worker holds no lease it must keep, and a fenced worker's receive leases nothing; so a worker
seen holding nothing cannot take a shard between that look and its stop. A fence whose stop
never came (its runner died in between) lapses after :data:`FENCE_SECONDS`.

A queue opened for one run (``run_id``) receives only that run's messages: a local worker is
started for one run, with that run's environment, slots and options, and never serves another.

The event bus beside it is :mod:`worker.backends.local.events`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from itertools import islice
from pathlib import Path

from worker import defaults
from worker.backends.local.bell import Bell, WorkBell, ring_workers
from worker.backends.local.db import Db
from worker.backends.local.fleet_leases import FleetLeases
from worker.clock import SYSTEM_CLOCK, Clock, SystemClock
from worker.protocol import WorkMessage
from worker.queue import Delivery, QueueStats, WorkQueue

FENCE_SECONDS = 30.0  # a fenced worker not stopped by then takes work again


POLL_FIRST = 0.002  # seconds of the first pause between two empty looks
POLL_MOST = 0.05  # and of the longest, each twice the one before


def backoff(clock: Clock, deadline: float, waited: int, bell: Bell | None = None) -> bool:
    """Pause a little (:data:`POLL_FIRST`, doubling each time to :data:`POLL_MOST`) unless
    the deadline passed; False when it has. ``bell``: the pause ends when it rings (a worker
    waiting for work: its run's shards are taken as they are published, not at the next
    look). An empty look costs a read, no lock (:meth:`LocalQueue._receive_now`)."""
    remaining = deadline - clock.monotonic()
    if remaining <= 0:
        return False
    pause = min(POLL_FIRST * 2**waited, POLL_MOST, remaining)
    if bell is None:
        clock.sleep(pause)
    else:
        bell.wait(pause)
    return True


def message_row(message: WorkMessage, at: float) -> tuple[str, str, str, float]:
    return (message.run_id, message.shard_id, message.to_json().decode(), at)


INSERT_MESSAGE = "INSERT INTO messages (run_id, shard_id, body, available_at) VALUES (?, ?, ?, ?)"
# The messages a receive may lease, oldest first; ``run`` narrows them to one run's (an index
# on (run_id, dead, available_at) serves it in order, whatever other runs have queued).
_READY = (
    "SELECT id, body, deliveries FROM messages WHERE {run}dead = 0 AND available_at <= ?"
    " ORDER BY available_at, id LIMIT ?"
)

_ANY_READY = "SELECT 1 FROM messages WHERE {run}dead = 0 AND available_at <= ? LIMIT 1"
_FENCED = "SELECT 1 FROM fences WHERE worker = ? AND at > ?"


class LocalQueue(FleetLeases, WorkQueue):
    """The work queue in ``queue.db``; ``run_id``: receive that run's messages only."""

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_deliveries: int = defaults.MAX_DELIVERIES,
        db: Db | None = None,
        run_id: str | None = None,
    ):
        self._db = db if db is not None else Db(path)
        self._clock = clock
        self.lease_seconds = lease_seconds
        self.max_deliveries = max_deliveries
        self.run_id = run_id
        # A worker of one run waits for work on its bell (only where time is the system's:
        # a test's clock never waits on a pipe).
        self._bell = (
            WorkBell(self._root, run_id)
            if run_id is not None and isinstance(clock, SystemClock)
            else None
        )
        self._interrupted = False  # the worker is stopping: receives return at once

    @property
    def db(self) -> Db:
        return self._db

    @property
    def clock(self) -> Clock:
        return self._clock

    def publish(
        self, messages: Iterable[WorkMessage], *, delay: float = 0.0, front: bool = False
    ) -> int:
        count = 0
        it = iter(messages)
        while batch := list(islice(it, defaults.PUBLISH_BATCH)):
            at = 0.0 if front else self._clock.time() + delay
            rows = [message_row(m, at) for m in batch]
            with self._db.transaction() as conn:
                conn.executemany(INSERT_MESSAGE, rows)
            count += len(rows)
            if delay <= 0:
                ring_workers(self._root, {m.run_id for m in batch})
        return count

    @property
    def _root(self) -> Path:
        return self._db.path.parent

    def receive(
        self, max_messages: int, timeout: float, *, worker: str | None = None
    ) -> list[Delivery]:
        deadline = self._clock.monotonic() + timeout
        waited = 0
        while True:
            got = self._receive_now(max_messages, worker)
            bell = self._bell.of(worker) if self._bell is not None and worker else None
            if got or self._interrupted or not backoff(self._clock, deadline, waited, bell):
                return got
            waited += 1

    def interrupt(self) -> None:
        # A stopped worker saw its stop only once its wait for work ran out (20 ms): a run's
        # drain waited that long for each of its workers. Its bell ends the pause under way.
        self._interrupted = True
        if self._bell is not None:
            self._bell.ring()

    def _receive_now(self, max_messages: int, worker: str | None) -> list[Delivery]:
        if max_messages < 1:
            return []
        now = self._clock.time()
        out: list[Delivery] = []
        run = "" if self.run_id is None else "run_id = ? AND "
        only: tuple[object, ...] = () if self.run_id is None else (self.run_id,)
        # An idle poll looks without the write lock first (a read never waits for a writer):
        # most find nothing, and taking the lock to see that kept the writers waiting.
        if not self._db.conn().execute(_ANY_READY.format(run=run), (*only, now)).fetchone():
            return out
        query, args = _READY.format(run=run), (*only, now, max_messages)
        with self._db.transaction() as conn:
            if (
                worker is not None
                and conn.execute(_FENCED, (worker, now - FENCE_SECONDS)).fetchone()
            ):
                return out  # about to be stopped: it takes nothing more
            rows = conn.execute(query, args).fetchall()
            for row_id, body, deliveries in rows:
                if deliveries >= self.max_deliveries:
                    conn.execute(
                        "UPDATE messages SET dead = 1, lease = NULL, worker = NULL WHERE id = ?",
                        (row_id,),
                    )
                    continue
                lease = secrets.token_hex(8)
                conn.execute(
                    "UPDATE messages SET available_at = ?, deliveries = deliveries + 1, lease = ?,"
                    " worker = ? WHERE id = ?",
                    (now + self.lease_seconds, lease, worker, row_id),
                )
                message = WorkMessage.from_json(body)
                out.append(Delivery(message, deliveries + 1, (row_id, lease)))
        return out

    def ack(self, delivery: Delivery) -> None:
        # By id alone: once a shard is committed or finally failed, no copy needs running again.
        row_id, _ = delivery.handle
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM messages WHERE id = ?", (row_id,))

    def nack(self, delivery: Delivery, *, delay: float = 0.0) -> None:
        row_id, lease = delivery.handle
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE messages SET available_at = ?, lease = NULL, worker = NULL"
                " WHERE id = ? AND lease = ?",
                (self._clock.time() + delay, row_id, lease),
            )
        if delay <= 0:
            ring_workers(self._root, [delivery.message.run_id])

    def requeue(self, delivery: Delivery, message: WorkMessage, *, front: bool = False) -> None:
        # One update: the new body, a fresh delivery count, and (front) ahead of everything.
        row_id, lease = delivery.handle
        at = 0.0 if front else self._clock.time()
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE messages SET body = ?, deliveries = 0, available_at = ?, lease = NULL,"
                " worker = NULL WHERE id = ? AND lease = ?",
                (message.to_json().decode(), at, row_id, lease),
            )
        ring_workers(self._root, [message.run_id])

    def extend(self, delivery: Delivery, seconds: float) -> None:
        row_id, lease = delivery.handle
        with self._db.transaction() as conn:
            conn.execute(
                "UPDATE messages SET available_at = ? WHERE id = ? AND lease = ?",
                (self._clock.time() + seconds, row_id, lease),
            )

    def extend_many(self, deliveries: Iterable[Delivery], seconds: float) -> None:
        """Extend several leases in one transaction (a worker holding prefetched shards)."""
        until = self._clock.time() + seconds
        rows = [(until, *d.handle) for d in deliveries]
        if rows:
            with self._db.transaction() as conn:
                conn.executemany(
                    "UPDATE messages SET available_at = ? WHERE id = ? AND lease = ?", rows
                )

    def leases(self, run_id: str) -> dict[str, str] | None:
        rows = (
            self._db.conn()
            .execute(
                "SELECT shard_id, worker FROM messages WHERE run_id = ? AND dead = 0"
                " AND lease IS NOT NULL AND available_at > ?",
                (run_id, self._clock.time()),
            )
            .fetchall()
        )
        return {shard: worker or "" for shard, worker in rows}

    def pending(self, run_id: str) -> set[str] | None:
        rows = (
            self._db.conn()
            .execute(
                "SELECT DISTINCT shard_id FROM messages WHERE run_id = ? AND dead = 0", (run_id,)
            )
            .fetchall()
        )
        return {shard for (shard,) in rows}

    def dead_letters(self, max_messages: int = 100) -> list[WorkMessage]:
        # A read first: the runner asks every reconcile, and the write lock it would take
        # otherwise waits on the workers' commits.
        if not self._db.conn().execute("SELECT 1 FROM messages WHERE dead = 1 LIMIT 1").fetchone():
            return []
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
        queued, leased, dead = (
            self._db.conn()
            .execute(
                "SELECT"
                " COALESCE(SUM(dead = 0 AND (lease IS NULL OR available_at <= ?)), 0),"
                " COALESCE(SUM(dead = 0 AND lease IS NOT NULL AND available_at > ?), 0),"
                f" COALESCE(SUM(dead = 1), 0) FROM messages {where}",
                (now, now, *args),
            )
            .fetchone()
        )
        return QueueStats(queued=queued, leased=leased, dead=dead)

    def close(self) -> None:
        self._db.close()
        if self._bell is not None:
            self._bell.close()
