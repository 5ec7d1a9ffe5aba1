"""The scale policy: how many workers a run should have, and which may be removed.

:func:`decide_scale` is a pure function of what the runner knows, so the watch loop, the tests
and the fleet simulator (:mod:`runner.sim`, ``bench/simulate.py``) all run the same decisions.
Which workers a run's runner may then delete, and deleting them, is
:class:`runner.engine.release.Release`'s.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

from runner.engine.fleet import Instance
from worker.protocol import EventKind

log = logging.getLogger("cflow.runner")

SPECULATE_FACTOR = 3.0  # a straggler has run this many times the median duration...
SPECULATE_QUANTILE = 99  # ...and longer than this percentile of finished ones (natural tails)
SPECULATE_MIN_FINISHED = 20  # shards that must have finished before the durations are trusted
SPECULATE_WINDOW = 1000  # recent durations the threshold is taken over
SPECULATE_MAX_BACKUPS = 2  # per shard; a second only while backups have been winning


@dataclass(frozen=True)
class ScaleDecision:
    add: int = 0
    delete: list[str] = field(default_factory=list)


def decide_scale(
    *,
    outstanding: int,
    max_workers: int,
    slots: int,
    instances: list[Instance],
    idle: set[str],
    busy: set[str],
    stale: set[str] | frozenset[str] = frozenset(),
    spoken_for: set[str] | frozenset[str] = frozenset(),
    elsewhere: set[str] | frozenset[str] = frozenset(),
    publishing: bool = False,
) -> ScaleDecision:
    """How to resize: enough instances for the outstanding shards, removing only idle ones.

    ``outstanding`` counts queued plus running shards; a shard whose lease lapsed (its worker
    froze or hung) is queued work again. ``stale`` names such workers: they hold no live lease
    and have not been heard from since, so they are neither busy nor capacity. More workers are
    started beside them, but they are not deleted while work remains (one may thaw and commit,
    harmlessly: the first commit wins); at the end they go like every other worker.

    When nothing is outstanding every instance known to work for no run goes: still
    ``starting``, ``idle`` (the caller passes every worker it knows free then,
    :meth:`runner.engine.run_view.RunView.free`) or ``stale``. The others may be busy with
    another run of the deployment: they are left to their own runner, or to their idle timeout
    (a worker with nothing to do removes itself).

    ``spoken_for`` names instances another run's runner asked for, still booting or not yet
    at work (:mod:`runner.engine.asks`): they are that runner's to wait for, never deleted
    here.
    ``elsewhere`` names workers busy with another run's shards (``busy`` names them too):
    while work remains they are no capacity of this run and no count against its
    ``max_workers``, so a run is not left waiting for another's long shards to end.

    While the run is still ``publishing`` (its items are still being read: a stream) no ready
    or starting instance is surplus: the queue running dry between two batches is no end of
    the work, and a worker deleted then is started again at the next batch (on Google Cloud a
    VM booted again). A stream that stalls for good leaves its workers to their idle timeout.

    Otherwise the surplus goes in this order: instances still ``starting`` (they cannot be
    busy, are the furthest from doing work, and deleting a preempted one stops the group
    recreating a VM nobody needs), then instances that said they are idle, keeping as many of
    those as there are queued shards: a ready worker takes queued work at once, where a booting
    one would take a minute or two.
    """
    slots = max(slots, 1)
    # An instance with an error (one the group cannot create for lack of quota, a VM that failed
    # to boot) is no capacity, but still counts against max_workers: adding more would only ask
    # for more of what the project cannot give. One that will never work is removed.
    broken = sorted(i.name for i in instances if i.removable and i.status != "stopping")
    errored = [i for i in instances if i.error and i.status != "stopping" and not i.removable]
    live = [i for i in instances if i.status != "stopping" and not i.error and not i.removable]
    doomed = sorted(i.name for i in errored)
    if outstanding <= 0:
        known = idle | stale
        free = sorted(
            i.name
            for i in live
            if i.name not in busy
            and i.name not in spoken_for
            and (i.status == "starting" or i.name in known)
        )
        return ScaleDecision(delete=broken + doomed + free)
    # A stale worker is no capacity and no count against max_workers: it gets a replacement.
    # Nor is one busy with another run.
    able = [i for i in live if (i.name not in stale or i.name in busy) and i.name not in elsewhere]
    target = min(max_workers, math.ceil(outstanding / slots))
    if len(able) < target:
        room = max(max_workers - len(able) - len(errored), 0)
        return ScaleDecision(add=min(target - len(able), room), delete=broken)
    surplus = len(able) + len(errored) - target
    if surplus <= 0:
        return ScaleDecision(delete=broken)
    if publishing:
        return ScaleDecision(delete=broken + doomed[:surplus])
    free_now = [i for i in able if i.name not in busy]
    starting = sorted(
        i.name for i in free_now if i.status == "starting" and i.name not in spoken_for
    )
    ready_idle = sorted(
        i.name
        for i in free_now
        if i.status != "starting" and i.name in idle and i.name not in spoken_for
    )
    # At least this many wait for a worker.
    queued = max(outstanding - len(busy - elsewhere) * slots, 0)
    keep = math.ceil(queued / slots)
    spare = doomed + starting + ready_idle[: max(len(ready_idle) - keep, 0)]
    return ScaleDecision(delete=broken + spare[:surplus])


@dataclass
class Stragglers:
    """Speculative re-execution near the end of a run (MapReduce's backup tasks).

    The watcher reports each shard event with :meth:`saw`; once nothing is queued, :meth:`pick`
    names running shards that have run longer than ``factor`` times the median finished
    duration and than the ``quantile``-th percentile of them (so a naturally heavy tail is not
    mistaken for stragglers), one backup each. The runner publishes a backup message per
    straggler and counts it as outstanding work until it starts, so an idle worker stays (or
    one is added) to take it. The first attempt to commit wins, so a backup is always safe. When
    one wins, :meth:`take_losers` names the workers still running the shard's other attempts so
    the runner can release them instead of paying for work that will be discarded. A backup
    can straggle too: it gets a backup of its own, but only while backups have been beating the
    attempts they backed up (evidence that the slowness is the machines').

    It pays when slowness belongs to the machine (a straggler VM: the backup runs at the usual
    speed); when it belongs to the shard's data the backup is as slow and only costs VM time.
    """

    factor: float = SPECULATE_FACTOR
    quantile: int = SPECULATE_QUANTILE
    min_finished: int = SPECULATE_MIN_FINISHED
    max_backups: int = SPECULATE_MAX_BACKUPS
    started_at: dict[str, float] = field(default_factory=dict)  # shard -> latest attempt's start
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=SPECULATE_WINDOW))
    backups: dict[str, int] = field(default_factory=dict)  # shard -> backups published
    first_worker: dict[str, str] = field(default_factory=dict)  # backed-up shard -> its original
    wins: int = 0  # backed-up shards a backup committed
    losses: int = 0  # backed-up shards the original committed
    waiting: set[str] = field(default_factory=set)  # backups published, not started yet
    workers: dict[str, set[str]] = field(default_factory=dict)  # backed-up shard -> its workers
    losers: set[str] = field(default_factory=set)

    def saw(self, kind: EventKind, shard: str, worker: str, now: float) -> None:
        if kind is EventKind.STARTED:
            self.started_at[shard] = now
            self.waiting.discard(shard)
            if shard in self.workers:
                self.workers[shard].add(worker)
            return
        start = self.started_at.pop(shard, None)
        if kind is not EventKind.SUCCEEDED:
            self.workers.get(shard, set()).discard(worker)
            return
        self.waiting.discard(shard)
        if shard in self.workers:
            self.losers |= self.workers.pop(shard) - {worker}
            if worker == self.first_worker.get(shard):
                self.losses += 1
            else:
                self.wins += 1
        elif shard not in self.backups and start is not None:
            self.durations.append(now - start)

    def threshold(self) -> float | None:
        """Seconds after which a running attempt is a straggler; None until enough finished."""
        if len(self.durations) < self.min_finished:
            return None
        tail = statistics.quantiles(self.durations, n=100)[self.quantile - 1]
        return max(self.factor * statistics.median(self.durations), tail)

    def pick(self, now: float, running: Mapping[str, str]) -> list[str]:
        """Stragglers to back up now; ``running`` maps each running shard to its worker."""
        threshold = self.threshold()
        if threshold is None:
            return []
        most = self.max_backups if self.wins > self.losses else 1
        chosen = [
            shard
            for shard in running
            if shard not in self.waiting
            and self.backups.get(shard, 0) < most
            and (start := self.started_at.get(shard)) is not None
            and now - start > threshold
        ]
        for shard in chosen:
            self.backups[shard] = self.backups.get(shard, 0) + 1
            self.first_worker.setdefault(shard, running[shard])
            self.workers.setdefault(shard, set()).add(running[shard])
        self.waiting.update(chosen)
        return chosen

    def take_losers(self) -> set[str]:
        """Workers whose attempt lost to another that committed first, named once."""
        losers, self.losers = self.losers, set()
        return losers
