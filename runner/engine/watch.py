"""Watching a run: live counts from events, truth from the store, and the fleet sized to the work.

Events (started, succeeded, failed, ...) make progress feel live; every few seconds the watcher
reconciles against the store's commit and failure markers, so a lost or duplicated event never
misreports a run. A reconcile reads one bounded page of markers, continuing where the last one
stopped and wrapping around, so its cost stays flat as a run grows; a full pass is made only
when the watcher starts and to confirm the end.

Running shards are the ones whose lease lives: the queue's own lease records where it keeps
them (local), otherwise a start or heartbeat event within the lease period. A worker whose
leases lapsed (frozen, hung) is neither busy nor capacity, and its shard is queued work again.
A shard with no result, no failure, no queue message and no lease is lost
(:mod:`runner.engine.lost`) and is put on the queue again; the first commit still wins.

Each poll also applies the scale policy: grow to the outstanding work, delete idle instances as
the queue drains, and end at zero.

Workers are shared by every run of a deployment. When its run is over (settled, cancelled or
halted) a runner deletes only the workers it knows work for no other run
(:class:`runner.engine.release.Release`), and keeps listening for a while to the ones it does not
know about yet. A worker busy with another run is left to that run's runner, or to its own idle
timeout.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from runner.engine import runs
from runner.engine.asks import Asks
from runner.engine.fleet import Fleet, Instance
from runner.engine.lost import LostShards, attempt_holders
from runner.engine.pace import Pace
from runner.engine.policy import decide_scale
from runner.engine.release import Release
from runner.engine.run_view import IDLE_SETTLE, RunView
from runner.engine.speculation import Speculation
from worker import defaults
from worker.clock import SYSTEM_CLOCK, Clock, SystemClock
from worker.errors import DiskFull
from worker.protocol import Event, EventKind, Manifest, RunState
from worker.queue import EventBus, WorkQueue
from worker.store import Store

log = logging.getLogger("cflow.runner")

DISK_FULL_SECONDS = 10.0  # a store's disk full this long stops the watch (the run waits)
RECONCILE_PAGE = 1000  # markers of each kind read per reconcile (one list call on GCS)


def env_seconds(name: str) -> float:
    """``CFLOW_<name>`` (the same setting the workers read), else the default."""
    raw = os.environ.get(f"CFLOW_{name}")
    try:
        return float(raw) if raw else float(getattr(defaults, name))
    except ValueError:
        return float(getattr(defaults, name))


@dataclass(frozen=True)
class Snapshot:
    run_id: str
    total: int
    succeeded: int
    failed: int
    running: int
    workers: int
    rate: float  # shards per second, recent
    elapsed: float
    preempted: int
    retried: int
    cancelled: bool = False
    cached: int = 0  # of the succeeded, reused from earlier runs (runner.engine.cache)
    # Its shards are still being published: ``total`` counts one more than went out, as the
    # manifest did when last read, and what workers commit may already count shards of a
    # batch that went out since (a batch's messages go before its count is written).
    publishing: bool = False

    @property
    def queued(self) -> int:
        return max(self.total - self.succeeded - self.failed - self.running, 0)

    @property
    def finished(self) -> bool:
        """Every shard settled: never while the run is still being published (its shards
        seen committed could outnumber the count last read, and the run would be recorded
        finished with the rest of its items never read)."""
        return not self.publishing and self.succeeded + self.failed >= self.total

    @property
    def eta(self) -> float | None:
        remaining = self.total - self.succeeded - self.failed
        return remaining / self.rate if self.rate > 0 else None


class Rate:
    """Shards settled per second over the last 64 looks."""

    def __init__(self) -> None:
        self._seen: deque[tuple[float, int]] = deque(maxlen=64)

    def at(self, now: float, settled: int) -> float:
        self._seen.append((now, settled))
        first_t, first_done = self._seen[0]
        return (settled - first_done) / (now - first_t) if now > first_t else 0.0


@dataclass
class FullDisk:
    """A disk that stays full stops the watch with its one line: the workers wait for space
    and nothing is lost, but watching a run that cannot move helps no one."""

    since: float | None = None  # since when the store's disk is full

    def check(self, fleet: Fleet | None, now: float, run_id: str) -> None:
        full = fleet.disk_full() if fleet is not None else None
        if full is None:
            self.since = None
        elif self.since is None:
            self.since = now
        elif now - self.since >= DISK_FULL_SECONDS:
            raise DiskFull(f"{full}; watch it again with `runner watch {run_id}`")


@dataclass
class Watcher:
    """Watches one run to its end: its view kept from events and reconciles, lost shards put
    back on the queue, and the fleet scaled to the outstanding work at every poll."""

    manifest: Manifest
    store: Store
    queue: WorkQueue
    events: EventBus
    fleet: Fleet | None = None
    max_workers: int = 0
    slots: int = 1
    clock: Clock = SYSTEM_CLOCK
    reconcile_seconds: float = defaults.RECONCILE_SECONDS
    on_event: Callable[[Event], None] | None = None
    speculate: bool = False  # back up stragglers once nothing is queued (engine.speculation)
    # A worker silent this long lost its lease; the workers' own settings where given.
    lease_seconds: float = field(default_factory=lambda: env_seconds("LEASE_SECONDS"))
    heartbeat_seconds: float = field(default_factory=lambda: env_seconds("HEARTBEAT_SECONDS"))
    # A VM listed running whose worker never spoke this long is taken for frozen.
    boot_seconds: float = field(default_factory=lambda: env_seconds("BOOT_SECONDS"))
    # Whether every worker sends heartbeats during long attempts (this version's agent does).
    # False: trust a silence only once some heartbeat was seen (workers that never send them
    # would otherwise look frozen in every long attempt).
    expect_heartbeats: bool = False
    page: int = RECONCILE_PAGE
    # Locally a poll is cheap and the watch loop looks often, so a short run's end is seen at
    # once; while nothing happens it slows down to this pace (None: always ``poll_seconds``).
    quiet_poll_seconds: float | None = None
    idle_settle: float = IDLE_SETTLE  # an idle word stands this long before its worker may go
    # Shards committed at submit from earlier runs' (never published): a count, or a callable
    # where it still grows (a stream's publisher reuses batch by batch while the run is watched).
    cached: int | Callable[[], int] = 0
    # The ids of shards reused since the last call, once the manifest counts them (a stream
    # reusing while watched): counted at the next poll, not at a reconcile (they send no event).
    reused: Callable[[], list[str]] | None = None

    def __post_init__(self) -> None:
        self._started = self.clock.monotonic()
        self._last_reconcile = float("-inf")
        self._reconcile_every = self.reconcile_seconds
        self._rate = Rate()
        self.view = RunView(self.run_id)  # the shard sets and counts, shared with self.lost
        self.speculation = Speculation(self.run_id, self.store, self.queue)
        silence = self.lease_seconds + self.heartbeat_seconds  # an attempt's lease has lapsed
        self.lost = LostShards(self.view, self.queue, self.store, self.clock, silence=silence)
        self._markers = runs.MarkerPages(self.store, self.run_id, self.page)
        self._reconciled = False  # the first reconcile is a full pass (a true first frame)
        self.heard = False  # the last poll brought events
        self.disk = FullDisk()
        self.reconciles = 0  # how many, and what the last one cost (bench/reconcile.py)
        self.last_reconcile_seconds = 0.0
        self.pace = Pace(defaults.WATCH_POLL_SECONDS, self.quiet_poll_seconds)
        self.release = Release(
            self.view, self.run_id, self.clock, silence, self.idle_settle, self.boot_seconds
        )
        self.release.records = functools.partial(attempt_holders, self.store, self.run_id)
        if self.fleet is not None and self.fleet.lists_starting:
            self.release.asks = Asks(self.store, self.run_id, self.clock)

    @property
    def run_id(self) -> str:
        return self.manifest.run_id

    def poll(self, *, listen: bool = True) -> Snapshot:
        """One look: the events (unless not ``listen``), the store now and then, the fleet
        and its scaling."""
        self.heard = False
        for event in self.events.pull(max_events=10_000) if listen else ():
            self._apply(event)
            self.heard = True
        ids = self.reused() if self.reused is not None else []
        if ids or self.manifest.publishing:
            # A stream's count grows batch by batch and its end is a write of its own; read
            # after the ids, the manifest counts their batches.
            self.manifest = runs.load_manifest(self.store, self.run_id)
        if ids:
            self.view.succeed_all(ids)
            self.heard = True
        if self.clock.monotonic() - self._last_reconcile >= self._reconcile_every:
            self.reconcile()
        self._lapse(self.clock.monotonic())
        # One look at the fleet per poll: in the cloud each look is an API call.
        instances = self.fleet.instances() if self.fleet is not None else []
        self.view.listed(instances, self.clock.monotonic())
        self.disk.check(self.fleet, self.clock.monotonic(), self.run_id)
        snapshot = self.snapshot(instances)
        # Every shard settled: the watch confirms it and the run's end lets its workers go
        # (drain_fleet); meanwhile none is stopped (a stop costs the machine the worker's exit).
        if self.fleet is not None and not snapshot.finished:
            self.scale(snapshot, instances)
        return snapshot

    def reconcile(self, *, full: bool = False) -> None:
        """Bring the event-built view up to the store's truth (and collect dead letters).

        The first reconcile and ``full`` ones list every marker of the run; the others read
        one page of each kind of marker past where the last stopped, wrapping around. Listing
        can be slow, so the next reconcile waits at least ten times as long as this one took:
        reconciling never takes more than a tenth of the watcher's time.
        """
        started = time.perf_counter()
        now = self.clock.monotonic()
        self._last_reconcile = now
        # Leases before markers: a shard settled after this look has its marker by then.
        leases = self.queue.leases(self.run_id)
        probe = self.lost.probe(self.manifest, leases)
        for message in self.queue.dead_letters():  # taken off the queue: record every run's
            runs.mark_dead_lettered(self.store, message)
        self.manifest = runs.load_manifest(self.store, self.run_id)
        full = full or not self._reconciled
        view = self.view
        if full:
            view.settle_all(*self._markers.all())
            self._reconciled = True
        else:
            succeeded, failed = self._markers.next()
            view.succeed_all(succeeded)
            view.fail_all(failed)
        if leases is not None:
            view.running_from_leases(leases, now)
        view.drop_settled()
        self.lost.check(probe)
        took = time.perf_counter() - started
        self.reconciles += 1
        self.last_reconcile_seconds = took
        if not full:
            self._reconcile_every = max(self.reconcile_seconds, 10 * took)

    def _lapse(self, now: float) -> None:
        """Where the queue keeps no lease records (Pub/Sub): an attempt with no start or
        heartbeat within the lease period has lost its lease; its worker is stale."""
        if self.silence_told:
            self.view.lapse(now, self.release.silence)

    @property
    def silence_told(self) -> bool:
        """Whether a worker's silence tells: its heartbeats are expected, or some were heard."""
        return self.expect_heartbeats or self.view.heartbeats

    def _apply(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)
        shard = self.view.apply(event, self.clock.monotonic())
        if shard is not None and self.speculate:
            self.speculation.saw(EventKind(event.kind), shard, event.worker, self.clock.monotonic())

    def snapshot(self, instances: list[Instance] | None = None) -> Snapshot:
        now = self.clock.monotonic()
        view = self.view
        if instances is None:
            instances = self.fleet.instances() if self.fleet is not None else []
        return Snapshot(
            run_id=self.run_id,
            total=self.manifest.shard_count,
            succeeded=len(view.succeeded),
            failed=len(view.failed),
            running=len(view.running),
            workers=len(instances),
            rate=self._rate.at(now, view.settled),
            elapsed=now - self._started,
            preempted=view.preempted,
            retried=view.retried,
            cancelled=self.manifest.state == RunState.CANCELLED.value,
            cached=self.cached() if callable(self.cached) else self.cached,
            publishing=self.manifest.publishing,
        )

    def scale(self, snapshot: Snapshot, instances: list[Instance] | None = None) -> None:
        assert self.fleet is not None
        if instances is None:
            instances = self.fleet.instances()
        outstanding = snapshot.total - snapshot.succeeded - snapshot.failed
        if self.speculate:
            outstanding += self.speculation.step(
                self.view, self.release, self.fleet, self.clock.monotonic(), snapshot.queued
            )
        over = outstanding <= 0 and not snapshot.publishing  # every worker of this run may go
        idle = self.release.known(self.fleet, instances, over=over)
        quiet = set() if over else self.release.quiet(self.fleet, told=self.silence_told)
        decide = functools.partial(
            decide_scale,
            outstanding=outstanding,
            max_workers=self.max_workers,
            slots=self.slots,
            instances=instances,
            idle=idle,
            busy=self.view.busy_workers(),
            # Once the run is over, ``idle`` names every worker it may delete (Release.free).
            stale=self.view.stale if over else self.view.stale | quiet,
            elsewhere=self.view.busy_elsewhere(),
            publishing=snapshot.publishing,
        )
        decision = decide()
        # A starting VM the policy would delete may be one another run just asked for.
        if theirs := self.release.spoken_for(instances, decision.delete):
            decision = decide(spoken_for=theirs)
        if decision.add:  # where others may see the new VMs unnamed, said first (engine.asks)
            if self.release.asks is not None:
                self.release.asks.grow(self.fleet, decision.add)
            else:
                self.fleet.grow(decision.add)
        if decision.delete:
            self.release.delete(self.fleet, decision.delete, mine=over)

    def watch(
        self,
        *,
        on_update: Callable[[Snapshot], None] | None = None,
        poll_seconds: float = defaults.WATCH_POLL_SECONDS,
    ) -> Snapshot:
        """Poll until every shard is committed or failed (a final reconcile confirms it), or
        the run is cancelled."""
        bell = self.events.doorbell() if isinstance(self.clock, SystemClock) else None
        pace = self.pace = Pace(poll_seconds, self.quiet_poll_seconds, bell=bell)
        try:
            while True:
                snapshot = self.poll()
                if snapshot.cancelled:
                    return snapshot
                if snapshot.finished:
                    self.reconcile(full=True)
                    snapshot = self.snapshot()
                    if snapshot.finished:
                        if on_update is not None:
                            on_update(snapshot)
                        return snapshot
                if on_update is not None:
                    on_update(snapshot)
                pace.pause(self.clock, heard=self.heard, near=snapshot.queued == 0)
        finally:
            pace.close()  # its bell goes with the watch

    def drain_fleet(self, timeout: float = 30.0, *, wait: bool = True) -> bool:
        """After the run (settled, or cancelled: its tasks are stopped with their workers):
        delete the workers known to work for no other run, then wait for them to go
        (``wait=False``: later, with :meth:`wait_drained`)."""
        if self.fleet is not None:
            self._listen()
            self.release.drain(self.fleet)
        return self.wait_drained(timeout) if wait else True

    def wait_drained(self, timeout: float = 30.0) -> bool:
        """Keep listening and deleting until every instance is gone or known busy with another
        run (:meth:`Release.wait <runner.engine.release.Release.wait>`)."""
        if self.fleet is None:
            return True
        drained = self.release.wait(self.fleet, self._listen, timeout, self.pace.drain)
        if self.release.asks is not None:
            self.release.asks.forget()
        return drained

    def _listen(self) -> None:
        for event in self.events.pull(max_events=10_000):
            self._apply(event)
        self._lapse(self.clock.monotonic())
