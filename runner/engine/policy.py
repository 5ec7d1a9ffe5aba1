"""The scale policy: how many workers a run should have, and which may be removed.

:func:`decide_scale` is a pure function of what the runner knows, so the watch loop, the tests
and the fleet simulator (:mod:`runner.sim`, ``bench/simulate.py``) all run the same decisions.
:class:`Release` knows which workers a run's runner may delete, and deletes them: workers are
shared by every run of a deployment, and a runner never deletes one it does not know to work
for no other run.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from runner.engine.fleet import Fleet, Instance
from runner.engine.run_view import IDLE_SETTLE, RunView
from worker.clock import Clock
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
            if i.name not in busy and (i.status == "starting" or i.name in known)
        )
        return ScaleDecision(delete=broken + doomed + free)
    # A stale worker is no capacity and no count against max_workers: it gets a replacement.
    able = [i for i in live if i.name not in stale or i.name in busy]
    target = min(max_workers, math.ceil(outstanding / slots))
    if len(able) < target:
        room = max(max_workers - len(able) - len(errored), 0)
        return ScaleDecision(add=min(target - len(able), room), delete=broken)
    surplus = len(able) + len(errored) - target
    if surplus <= 0:
        return ScaleDecision(delete=broken)
    free_now = [i for i in able if i.name not in busy]
    starting = sorted(i.name for i in free_now if i.status == "starting")
    ready_idle = sorted(i.name for i in free_now if i.status != "starting" and i.name in idle)
    queued = max(outstanding - len(busy) * slots, 0)  # at least this many wait for a worker
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


@runtime_checkable
class LeaseRecords(Protocol):
    """A fleet that knows which runs each worker holds live leases of (the local one: the
    queue keeps its lease records). What it says is the truth about who works; other fleets'
    workers are known busy by their events."""

    def lease_runs(self) -> dict[str, set[str]]:
        """Worker -> the runs whose shards it holds live leases of."""
        ...


@dataclass
class Release:
    """Which workers one run's runner may delete, and deleting them.

    While work remains only idle workers go (:func:`decide_scale`); once the run is over, every
    worker known to work for no other run (:meth:`free`). Where the fleet keeps lease records
    (:class:`LeaseRecords`) they are the truth, read again right before each delete; elsewhere
    the workers' own words across runs tell (:meth:`RunView.free`), an idle word standing only
    once ``settle`` seconds passed with nothing else from its worker.
    """

    view: RunView
    run_id: str
    clock: Clock
    silence: float  # a worker unheard this long works for no run
    settle: float = IDLE_SETTLE
    boot: float = float("inf")  # one never heard this long never started (Hearing.mute)
    deleted: set[str] = field(default_factory=set)  # instances deleted here, still listed
    # Instances never heard from, at the last drain: the seconds before each is taken for silent.
    unheard: dict[str, float] = field(default_factory=dict)
    say: Callable[[str], None] | None = None  # what the drain waits for (None: the log)
    # Reads the run's own records: the workers holding an attempt of it that never ended
    # (:func:`runner.engine.lost.attempt_holders`); None: no records (none is such a holder).
    records: Callable[[], set[str]] | None = None

    def __post_init__(self) -> None:
        self._holders: set[str] | None = None

    def lease_runs(self, fleet: Fleet) -> dict[str, set[str]] | None:
        """Who holds leases of which runs, where the fleet knows (None: it does not)."""
        return fleet.lease_runs() if isinstance(fleet, LeaseRecords) else None

    def known(
        self, fleet: Fleet, instances: list[Instance], *, over: bool
    ) -> tuple[dict[str, set[str]] | None, set[str]]:
        """The lease records (read once the run is ``over``) and the workers the scale policy
        may take for idle: while work remains, those whose idle word stands (where lease
        records are kept, deleting checks them: :meth:`delete`); once the run is over, every
        one :meth:`free`."""
        if over:
            held = self.lease_runs(fleet)
            return held, self.free(instances, held)
        if isinstance(fleet, LeaseRecords):
            return None, self.view.idle
        return None, self.view.idle_for(self.clock.monotonic(), self.settle)

    def free(self, instances: list[Instance], held: dict[str, set[str]] | None) -> set[str]:
        """Workers this runner may delete now that its run is over: known to work for no other
        run (by the lease records where the fleet keeps them, else by what they said)."""
        if held is not None:
            return {i.name for i in instances if held.get(i.name, set()) <= {self.run_id}}
        now = self.clock.monotonic()
        unheard = {n for n in self.view.silent(now, self.silence) if not self.view.heard(n)}
        holders = self.holders() if unheard else set()
        return self.view.free(now, self.silence, self.settle, holders, self.boot)

    def holders(self) -> set[str]:
        """The workers the run's own records name as holding an attempt of it that never
        ended, read once: asked only once the run is over, when no attempt of it starts."""
        if self._holders is None:
            self._holders = self.records() if self.records is not None else set()
        return self._holders

    def elsewhere(self, held: dict[str, set[str]] | None) -> set[str]:
        """Workers known busy with another run."""
        others = self.view.busy_elsewhere()
        if held is not None:
            others |= {w for w, held_runs in held.items() if held_runs - {self.run_id}}
        return others

    def delete(
        self,
        fleet: Fleet,
        names: list[str],
        *,
        mine: bool = False,
        held: dict[str, set[str]] | None = None,
    ) -> None:
        """Delete these workers, except where the lease records say one holds work of another
        run (or, unless ``mine``, of this one): the records are the truth, events are late."""
        held = held if held is not None else self.lease_runs(fleet)
        if held is not None:
            allowed = {self.run_id} if mine else set()
            names = [n for n in names if held.get(n, set()) <= allowed]
        if not names:
            return
        log.info("scaling down: deleting idle %s", ", ".join(names))
        fleet.delete(names)
        self.view.idle.difference_update(names)
        self.deleted.update(names)

    def wait(self, fleet: Fleet, listen: Callable[[], None], timeout: float, pace: float) -> bool:
        """After the run: ``listen`` (take the events) and :meth:`drain`, every ``pace``
        seconds (or as soon as an idle word stands), until nothing is waited for. False when
        time ran out first: the workers still unknown are left to their idle timeout.

        An instance never heard from is not given up on while it may still speak: the wait
        lasts until it is silent past the bound (then deleted, and given ``timeout`` to go),
        whatever ``timeout`` says, and says so once."""
        deadline = self.clock.monotonic() + timeout
        told: set[str] = set()
        while True:
            listen()
            if not self.drain(fleet):
                return True
            now = self.clock.monotonic()
            if self.unheard:
                told |= self._tell_unheard(told, overdue=now >= deadline)
                deadline = max(deadline, now + max(self.unheard.values()) + timeout)
            if now >= deadline:
                return False
            settles = self.view.settles_in(now, self.settle)
            self.clock.sleep(min(pace, max(settles, 0.0), deadline - now))

    def _tell_unheard(self, told: set[str], *, overdue: bool) -> set[str]:
        """Say which never-heard instances the drain waits for, each once: when it has been
        unheard for half the bound (a working worker has spoken several times by then, even
        through a slow event stream), or once the drain is past its usual time; those said."""
        holders = self.holders()  # only those are deleted at the bound: the others, not said
        new = sorted(
            n
            for n, left in self.unheard.items()
            if n in holders and n not in told and (overdue or left <= self.silence / 2)
        )
        if new:
            most = max(self.unheard[n] for n in new)
            (self.say or log.warning)(
                f"waiting up to {most:.0f}s for {', '.join(new)}, not heard from since this"
                " runner started: deleted as frozen then, unless heard from"
            )
        return set(new)

    def drain(self, fleet: Fleet) -> list[str]:
        """One look at the fleet after the run: delete the workers now known free (and any
        that will never work); the instances still waited for: those deleted, until they are
        gone (or, in a fleet whose deleted instances go by themselves, listed stopping); those
        that worked for this run and have not said what they do now (not known busy with
        another run); and those running and never heard from, until they speak or are silent
        past the bound (:meth:`RunView.unheard`: frozen before this runner started, say, when
        it resumed), then deleted only if the run's own records name them holding one of its
        attempts (:meth:`free`). One still booting is deleted: it works for no run.
        """
        now = self.clock.monotonic()
        instances = fleet.instances()
        self.view.listed(instances, now)
        self.deleted &= {i.name for i in instances}  # a name seen again later is a new worker
        held = self.lease_runs(fleet)
        free = self.free(instances, held)
        self.delete(
            fleet,
            [
                i.name
                for i in instances
                if i.status != "stopping"
                and i.name not in self.deleted
                and (i.name in free or i.status == "starting" or i.error or i.removable)
            ],
            mine=True,
            held=held,
        )
        elsewhere = self.elsewhere(held)
        # Where lease records say who works, a worker that holds none is known free already.
        # A never-heard one is waited for until it speaks (then its word tells) or is silent
        # past the bound: deleted then only if the run's records name it (:meth:`free`).
        unheard = self.view.unheard(now, self.silence) if held is None else {}
        self.unheard = {n: left for n, left in unheard.items() if n not in self.deleted | elsewhere}
        return [
            i.name
            for i in instances
            if not self._going(fleet, i)
            and (
                i.name in self.deleted
                or i.name in self.unheard
                or (self.view.heard(i.name) and i.name not in elsewhere)
            )
        ]

    def _going(self, fleet: Fleet, instance: Instance) -> bool:
        """Deleted by this runner and listed stopping in a fleet whose instances then go by
        themselves (a managed group's VMs): nothing more to wait for."""
        return (
            fleet.deletes_by_itself
            and instance.status == "stopping"
            and instance.name in self.deleted
        )
