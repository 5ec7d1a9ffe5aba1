"""What the runner knows of one run while it watches it: which shards settled, which run where,
and which workers are idle or stale.

The view is built from events (quick, but one may be lost or come twice) and brought up to the
store's truth by the watcher's reconciles (:mod:`runner.engine.watch`); the lost-shard detector
(:mod:`runner.engine.lost`) reads it and records what it confirms. It holds no client: whoever
owns the queue and the store feeds it.

Workers are shared by every run of a deployment, so the view also keeps what each worker last
said of itself, whatever the run: :meth:`RunView.free` names the workers known to work for no
other run, the only ones a runner may delete when its run ends or is cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from runner.engine.fleet import Instance
from runner.engine.hearing import Hearing
from worker.protocol import Event, EventKind

log = logging.getLogger("cflow.runner")

# Seconds an idle word must stand, nothing else heard from its worker, before the worker is
# taken for idle: a receive may come back empty a moment before work arrives, and the start
# that follows the idle word is heard by then.
IDLE_SETTLE = 3.0


@dataclass
class RunView:
    """One run's shards by state, and the workers around them, as far as the runner knows."""

    run_id: str
    succeeded: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    running: dict[str, str] = field(default_factory=dict)  # shard -> worker
    elsewhere: dict[tuple[str, str], str] = field(default_factory=dict)  # other runs' shards
    idle: set[str] = field(default_factory=set)
    stale: set[str] = field(default_factory=set)  # workers whose leases lapsed, not heard since
    preempted: int = 0
    # Attempts started after the first heard of a shard, by their numbers (the events are read
    # from the run's start, or from its last retry: that round's first attempts)
    restarts: int = 0
    backups: int = 0  # of those, backups of stragglers (runner.engine.speculation)
    heartbeats: bool = False  # workers of this deployment send heartbeats
    others: bool = False  # a worker was heard working for another run

    def __post_init__(self) -> None:
        self._beats: dict[str, float] = {}  # shard -> its latest start or heartbeat
        self._elsewhere_beats: dict[tuple[str, str], float] = {}
        self._working_at: dict[str, float] = {}  # worker -> its latest start (by its clock)
        self._attempt: dict[str, int] = {}  # shard -> the highest attempt heard starting
        self._idle_since: dict[str, float] = {}  # worker -> its first idle word since it worked
        self.hearing = Hearing()  # when each worker was last heard, and listed running

    @property
    def retried(self) -> int:
        """Attempts started again after one that failed, or was lost with its worker (killed,
        frozen): the restarts less the preemptions and the backups. Counted from the attempt
        numbers, whatever order the events came in: a lost attempt says nothing itself."""
        return max(self.restarts - self.preempted - self.backups, 0)

    @property
    def settled(self) -> int:
        """How many shards succeeded or failed."""
        return len(self.succeeded) + len(self.failed)

    def waiting(self, total: int) -> int:
        """Shards of the run's ``total`` neither settled nor running: queued, or lost."""
        return total - self.settled - len(self.running)

    def is_settled(self, shard_id: str) -> bool:
        return shard_id in self.succeeded or shard_id in self.failed

    def outstanding(self, shard_ids: Iterable[str]) -> list[str]:
        """Those of ``shard_ids`` not settled, in their order."""
        return [s for s in shard_ids if not self.is_settled(s)]

    def succeed(self, shard_id: str) -> None:
        """The shard committed: that wins over any failure seen before."""
        self.succeeded.add(shard_id)
        self.failed.discard(shard_id)

    def fail(self, shard_id: str) -> None:
        """The shard failed, unless it committed (the first commit wins)."""
        if shard_id not in self.succeeded:
            self.failed.add(shard_id)

    def succeed_all(self, shard_ids: Iterable[str]) -> None:
        """:meth:`succeed` each of ``shard_ids``."""
        ids = set(shard_ids)
        self.succeeded.update(ids)
        self.failed.difference_update(ids)

    def fail_all(self, shard_ids: Iterable[str]) -> None:
        """:meth:`fail` each of ``shard_ids``."""
        self.failed.update(i for i in shard_ids if i not in self.succeeded)

    def settle_all(self, succeeded: set[str], failed: set[str]) -> None:
        """The store's full truth: every committed and every failed shard of the run."""
        self.succeeded = succeeded
        self.failed = failed - succeeded

    def busy_workers(self) -> set[str]:
        """Workers running a shard of this run or, as far as the events told, of another."""
        return set(self.running.values()) | set(self.elsewhere.values())

    def busy_elsewhere(self) -> set[str]:
        """Workers running another run's shard, as far as the events told."""
        return set(self.elsewhere.values())

    def listed(self, instances: Iterable[Instance], now: float) -> None:
        """What the fleet lists now (:meth:`Hearing.listed`)."""
        self.hearing.listed(instances, now)

    def heard(self, worker: str) -> bool:
        """Whether the worker said anything while this run was watched."""
        return worker in self.hearing

    def idle_for(self, now: float, settle: float = IDLE_SETTLE) -> set[str]:
        """Workers whose latest word is that they are idle, and who have said nothing else for
        ``settle`` seconds since their first idle word (an idle worker says so again every
        heartbeat: that does not start the wait over)."""
        return {w for w in self.idle if now - self._idle_since.get(w, now) >= settle}

    def settles_in(self, now: float, settle: float = IDLE_SETTLE) -> float:
        """Seconds until the next idle word that has not stood ``settle`` seconds does (inf:
        none waits)."""
        waits = [self._idle_since.get(w, float("-inf")) + settle - now for w in self.idle]
        return min((t for t in waits if t > 0), default=float("inf"))

    def silent(self, now: float, limit: float) -> set[str]:
        """Running instances not heard from for ``limit`` seconds (:meth:`Hearing.silent`)."""
        return self.hearing.silent(now, limit)

    def unheard(self, now: float, limit: float) -> dict[str, float]:
        """Running instances never heard from and not yet silent (:meth:`Hearing.unheard`)."""
        return self.hearing.unheard(now, limit)

    def quiet(self, now: float, limit: float, boot: float) -> set[str]:
        """:meth:`silent` instances whose last word was not that they are idle, or never heard
        from though running before this runner's first look (frozen while no runner watched):
        like :attr:`stale` workers, no capacity while work remains. One never heard from that
        came up under this runner's eyes is given the ``boot`` allowance first
        (:meth:`Hearing.mute`): its worker may still be starting (a GPU VM waits minutes for
        its driver), and taking it for none at once would start VM after VM."""
        found = self.hearing.found
        spoke = {n for n in self.silent(now, limit) - self.idle if n in self.hearing or n in found}
        return spoke | self.hearing.mute(now, limit, boot)

    def free(
        self,
        now: float,
        limit: float,
        settle: float = IDLE_SETTLE,
        holders: set[str] | frozenset[str] = frozenset(),
        boot: float = float("inf"),
    ) -> set[str]:
        """Workers this run's runner may delete once its run is over (settled or cancelled):
        nothing says they work for another run, and something says they work for none: they
        said they are idle; their lease of this run lapsed; or they are silent past ``limit``,
        heard from before (a heartbeat comes at least every period from a worker that works,
        whatever its run) or named by the run's own records as ``holders`` of an attempt of it
        that never ended
        (:func:`runner.engine.lost.attempt_holders`: frozen, say, before a resumed runner
        began to watch), or never heard from past the ``boot`` allowance (:meth:`Hearing.mute`:
        its worker never started, or froze before its first word). Once another run was
        heard of, an idle word must have stood ``settle`` seconds (:meth:`idle_for`): that
        run's work may follow it at once. With none, an idle worker is taken at its word.

        One last heard running a shard of this (cancelled) run is not free by that word: it
        stops the attempt itself at its next look at the run and may at once take another
        run's shard, before its words of both reach this runner. It is waited for until it
        says what it does now.

        A worker never heard from, named by no record of this run and within its boot
        allowance is left to its own run's runner, its idle timeout and the VM's hard bound: a
        resumed runner's events may come late, and deleting a busy VM of another run loses its
        work. One still unknown (it
        just finished a shard of this run and has not said it is idle yet) is neither, and is
        waited for.
        """
        idle = self.idle_for(now, settle if self.others else 0.0)
        frozen = {n for n in self.silent(now, limit) if n in self.hearing or n in holders}
        frozen |= self.hearing.mute(now, limit, boot)
        return (idle | self.stale | frozen) - self.busy_elsewhere()

    def apply(self, event: Event, now: float) -> str | None:
        """Record what one event says; the shard of this run it is about, if any."""
        kind = EventKind(event.kind)
        self.stale.discard(event.worker)  # heard from: not frozen
        self.hearing.word(event.worker, now)
        if kind is EventKind.HEARTBEAT:
            self.heartbeats = True
        if kind in (EventKind.STARTED, EventKind.HEARTBEAT):
            at = self._working_at.get(event.worker, event.at)
            self._working_at[event.worker] = max(at, event.at)
        if kind is EventKind.IDLE:
            # Events may come out of order: an idle older than a start says nothing now.
            if event.at >= self._working_at.get(event.worker, event.at):
                if event.worker not in self.idle:  # said again while idle: the wait goes on
                    self._idle_since[event.worker] = now
                self.idle.add(event.worker)
            return None
        if kind is EventKind.STOPPED:
            self.idle.discard(event.worker)
            return None
        if event.shard_id is None:
            return None
        if event.run_id != self.run_id:
            self._apply_elsewhere(event, kind, now)
            return None
        shard = event.shard_id
        if kind in (EventKind.STARTED, EventKind.HEARTBEAT):
            if not self.is_settled(shard):
                self.running[shard] = event.worker
                self._beats[shard] = now
            self.idle.discard(event.worker)
            if event.attempt is not None:
                seen = self._attempt.setdefault(shard, event.attempt)  # its first in this round
                if event.attempt > seen:
                    self.restarts += event.attempt - seen
                    self._attempt[shard] = event.attempt
            return shard
        self.running.pop(shard, None)
        self._beats.pop(shard, None)
        if kind is EventKind.SUCCEEDED:
            self.succeed(shard)
        elif kind is EventKind.FAILED:
            self.fail(shard)
        elif kind is EventKind.PREEMPTED:
            self.preempted += 1
        return shard

    def _apply_elsewhere(self, event: Event, kind: EventKind, now: float) -> None:
        # Workers are shared by every run of a deployment: one busy with another run's shard
        # must not be scaled away by this one.
        key = (event.run_id or "", event.shard_id or "")
        self.others = True
        if kind in (EventKind.STARTED, EventKind.HEARTBEAT):
            self.elsewhere[key] = event.worker
            self._elsewhere_beats[key] = now
            self.idle.discard(event.worker)
        else:
            self.elsewhere.pop(key, None)
            self._elsewhere_beats.pop(key, None)

    def running_from_leases(self, leases: dict[str, str], now: float) -> None:
        """The queue's lease records are the truth about what runs (the local backend)."""
        # A lease without a holder's name (a worker that does not give it) keeps the one the
        # events gave.
        named = {s: w or self.running.get(s, "") for s, w in leases.items()}
        for shard_id, worker in list(self.running.items()):
            if shard_id not in named and worker not in named.values():
                self.stale.add(worker)  # its lease lapsed: frozen, or hung
        self.running = {s: w for s, w in named.items() if not self.is_settled(s)}
        self.stale.difference_update(self.running.values())
        self._beats = dict.fromkeys(self.running, now)

    def drop_settled(self) -> None:
        """A settled shard runs no more, whatever the last event said."""
        for shard_id in list(self.running):
            if self.is_settled(shard_id):
                del self.running[shard_id]
                self._beats.pop(shard_id, None)

    def lapse(self, now: float, limit: float) -> None:
        """An attempt with no start or heartbeat for ``limit`` seconds has lost its lease; its
        worker is stale (where the queue keeps no lease records: Pub/Sub)."""
        for shard_id, worker in list(self.running.items()):
            if now - self._beats.get(shard_id, now) > limit:
                log.info("the lease of shard %s on %s lapsed", shard_id, worker)
                del self.running[shard_id]
                self._beats.pop(shard_id, None)
                if worker not in self.running.values():
                    self.stale.add(worker)
        for key, beat in list(self._elsewhere_beats.items()):
            if now - beat > limit:
                self.elsewhere.pop(key, None)
                del self._elsewhere_beats[key]
