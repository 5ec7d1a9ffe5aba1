"""Backup attempts of a run's stragglers near its end (``--speculate``): the first commit wins.

:class:`runner.engine.policy.Stragglers` decides which shards straggle; this publishes their
backups and lets go of the workers whose attempt lost, for the :class:`Watcher
<runner.engine.watch.Watcher>` at each poll.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from runner.engine import runs
from runner.engine.fleet import Fleet
from runner.engine.policy import Stragglers
from runner.engine.release import Release
from runner.engine.run_view import RunView
from worker.protocol import EventKind, WorkMessage
from worker.queue import WorkQueue
from worker.store import Store

log = logging.getLogger("cflow.runner")


@dataclass
class Speculation:
    """One run's backups: told each shard event (:meth:`saw`), asked at each poll (:meth:`step`)."""

    run_id: str
    store: Store
    queue: WorkQueue
    stragglers: Stragglers = field(default_factory=Stragglers)

    def saw(self, kind: EventKind, shard: str, worker: str, now: float) -> None:
        self.stragglers.saw(kind, shard, worker, now)

    def step(
        self, view: RunView, release: Release, fleet: Fleet | None, now: float, queued: int
    ) -> int:
        """Release workers whose attempt lost, and once nothing is queued publish a backup of
        each straggler; returns how many backups wait for a worker (outstanding work)."""
        losers = self.stragglers.take_losers() - view.busy_workers()
        if losers and fleet is not None:
            log.info("speculation: releasing %s (their attempts lost)", ", ".join(sorted(losers)))
            release.delete(fleet, sorted(losers), mine=True)
        if queued == 0:
            picked = set(self.stragglers.pick(now, view.running))
            if picked:
                log.info("speculating: backup attempts of %s", ", ".join(sorted(picked)))
                backups = [s for s in runs.iter_shards(self.store, self.run_id) if s.id in picked]
                view.backups += len(backups)  # their attempts are no retries
                self.queue.publish(
                    WorkMessage(self.run_id, s.to_dict(), backup=True) for s in backups
                )
        return len(self.stragglers.waiting)
