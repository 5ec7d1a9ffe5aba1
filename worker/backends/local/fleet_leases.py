"""What the local fleet reads and sets of its workers' leases in ``queue.db``: which runs each
worker holds live leases of, a fence on a worker about to be stopped, and the leases of one that
died let go at once (the queue a worker receives from is :mod:`worker.backends.local.queue`)."""

from __future__ import annotations

from collections.abc import Iterable

from worker.backends.local.db import Db
from worker.clock import Clock

_HELD_RUNS = (
    "SELECT DISTINCT run_id FROM messages WHERE worker = ? AND lease IS NOT NULL AND dead = 0"
    " AND available_at > ?"
)


class FleetLeases:
    """The fleet's side of :class:`~worker.backends.local.queue.LocalQueue`: its workers'
    leases, as the runner that stops them sees and fences them."""

    _db: Db
    _clock: Clock

    def fence(self, workers: Iterable[str], allowed: set[str]) -> list[str]:
        """Of these workers, fence those whose live leases are all of ``allowed`` runs, and
        return them: from now on they lease nothing, so one may be stopped without taking a
        shard with it. A worker that received work since it was last looked at is not fenced."""
        now = self._clock.time()
        fenced = []
        with self._db.transaction() as conn:
            for worker in workers:
                held = {run for (run,) in conn.execute(_HELD_RUNS, (worker, now))}
                if held <= allowed:
                    conn.execute("INSERT OR REPLACE INTO fences VALUES (?, ?)", (worker, now))
                    fenced.append(worker)
        return fenced

    def release(self, worker: str) -> int:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM fences WHERE worker = ?", (worker,))
            cur = conn.execute(
                "UPDATE messages SET available_at = 0, lease = NULL, worker = NULL"
                " WHERE worker = ? AND lease IS NOT NULL AND dead = 0",
                (worker,),
            )
            return cur.rowcount

    def lease_runs(self) -> dict[str, set[str]]:
        """Worker -> the runs whose messages it holds live leases of, every run's."""
        held: dict[str, set[str]] = {}
        rows = (
            self._db.conn()
            .execute(
                "SELECT DISTINCT worker, run_id FROM messages WHERE dead = 0"
                " AND lease IS NOT NULL AND available_at > ? AND worker <> ''",
                (self._clock.time(),),
            )
            .fetchall()
        )
        for worker, run_id in rows:
            held.setdefault(worker, set()).add(run_id)
        return held
