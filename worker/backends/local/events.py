"""The embedded event bus: rows of the queue's SQLite file, read through a cursor.

Events are never deleted by a reader: each runner watching a run sees that run's events and the
worker-level ones (idle, stopped), so two runs in one store never take each other's events. Rows
older than :data:`EVENT_RETENTION` are pruned.
"""

from __future__ import annotations

from pathlib import Path

from worker.backends.local.bell import Bell
from worker.backends.local.db import Db
from worker.backends.local.queue import backoff
from worker.clock import SYSTEM_CLOCK, Clock
from worker.protocol import Event
from worker.queue import EventBus

EVENT_RETENTION = 3600.0  # seconds events are kept for runners that attach late
_PRUNE_EVERY = 1000  # event inserts between prunes


def event_row(event: Event) -> tuple[str | None, float, str]:
    return (event.run_id, event.at, event.to_json().decode())


INSERT_EVENT = "INSERT INTO events (run_id, at, body) VALUES (?, ?, ?)"


class LocalEvents(EventBus):
    """Events in the same SQLite file.

    Workers publish through a bus with no ``run_id``; a runner pulls through one opened for its
    run, reading forward from the first event at or after ``since`` (seconds since the epoch).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Clock = SYSTEM_CLOCK,
        run_id: str | None = None,
        since: float | None = None,
        db: Db | None = None,
    ):
        self._db = db if db is not None else Db(path)
        self._clock = clock
        self.run_id = run_id
        self._cursor = 0
        self._inserts = 0
        if since is not None:  # from the first event at or after it; none yet: from the end
            # MIN(id + 0), not MIN(id): the events of the last hour are many (EVENT_RETENTION),
            # and MIN(id) would walk them all from the oldest instead of the index on `at`.
            row = (
                self._db.conn()
                .execute(
                    "SELECT COALESCE(MIN(id + 0) - 1, (SELECT MAX(id) FROM events), 0)"
                    " FROM events WHERE at >= ?",
                    (since,),
                )
                .fetchone()
            )
            self._cursor = max(int(row[0]), 0)

    def publish(self, event: Event) -> None:
        with self._db.transaction() as conn:
            conn.execute(INSERT_EVENT, event_row(event))
            self._inserts += 1
            if self._inserts % _PRUNE_EVERY == 0:
                prune_events(conn, self._clock.time())

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        deadline = self._clock.monotonic() + timeout
        waited = 0
        conn = self._db.conn()
        while True:
            if self.run_id is None:
                query, args = "SELECT id, body FROM events WHERE id > ?", (self._cursor,)
            else:
                query = (
                    "SELECT id, body FROM events WHERE id > ? AND (run_id = ? OR run_id IS NULL)"
                )
                args = (self._cursor, self.run_id)  # type: ignore[assignment]
            rows = conn.execute(f"{query} ORDER BY id LIMIT ?", (*args, max_events)).fetchall()
            if rows:
                self._cursor = rows[-1][0]
            if rows or not backoff(self._clock, deadline, waited):
                return [Event.from_json(body) for _, body in rows]
            waited += 1

    def doorbell(self) -> Bell | None:
        """The run's bell (:mod:`worker.backends.local.bell`), for the caller to close; None
        for a bus of no run's or where named pipes cannot be made."""
        if self.run_id is None:
            return None
        return Bell.open(self._db.path.parent, self.run_id)

    def close(self) -> None:
        self._db.close()


def prune_events(conn: object, now: float) -> None:
    conn.execute("DELETE FROM events WHERE at < ?", (now - EVENT_RETENTION,))  # type: ignore[attr-defined]
