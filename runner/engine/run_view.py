"""What the runner knows of one run while it watches it: which shards settled, which run where,
and which workers are idle or stale.

The view is built from events (quick, but one may be lost or come twice) and brought up to the
store's truth by the watcher's reconciles (:mod:`runner.engine.watch`); the lost-shard detector
(:mod:`runner.engine.lost`) reads it and records what it confirms. It holds no client: whoever
owns the queue and the store feeds it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from worker.protocol import Event, EventKind

log = logging.getLogger("cflow.runner")


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
    retried: int = 0
    heartbeats: bool = False  # workers of this deployment send heartbeats

    def __post_init__(self) -> None:
        self._beats: dict[str, float] = {}  # shard -> its latest start or heartbeat
        self._elsewhere_beats: dict[tuple[str, str], float] = {}

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

    def apply(self, event: Event, now: float) -> str | None:
        """Record what one event says; the shard of this run it is about, if any."""
        kind = EventKind(event.kind)
        self.stale.discard(event.worker)  # heard from: not frozen
        if kind is EventKind.HEARTBEAT:
            self.heartbeats = True
        if kind is EventKind.IDLE:
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
            return shard
        self.running.pop(shard, None)
        self._beats.pop(shard, None)
        if kind is EventKind.SUCCEEDED:
            self.succeed(shard)
        elif kind is EventKind.FAILED:
            self.fail(shard)
        elif kind is EventKind.PREEMPTED:
            self.preempted += 1
        elif kind is EventKind.RETRYING:
            self.retried += 1
        return shard

    def _apply_elsewhere(self, event: Event, kind: EventKind, now: float) -> None:
        # Workers are shared by every run of a deployment: one busy with another run's shard
        # must not be scaled away by this one.
        key = (event.run_id or "", event.shard_id or "")
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
