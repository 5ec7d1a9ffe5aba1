"""Standard-VM fallback (``--fallback standard``): Spot first, standard VMs for the tail.

A run with fallback has two groups of its shape: the Spot one and a standard one (on Google
Cloud both come from :mod:`runner.backends.gcp.shapes.groups`; the standard one is
``shape.standard()``). Each pulls its own shape's subscription
(:mod:`runner.backends.gcp.shapes.queues`), so the fallback moves capacity *and*
messages:

- while Spot works, every VM the runner asks for is a Spot VM;
- the fallback starts (and stays on) when a shard has been preempted ``after_preemptions``
  times (counted from the workers' ``preempted`` events, the same count
  ``WorkMessage.preemptions`` carries), or when Spot VMs have been refused for capacity
  (``QUOTA_EXCEEDED``, ``ZONE_RESOURCE_POOL_EXHAUSTED``: the group's creation errors, see
  :func:`runner.backends.gcp.instances.instance_error`) for ``capacity_grace`` seconds;
- from then on new VMs are standard, and Spot VMs that are not working (refused, being
  recreated after a preemption, still booting, or running and idle by its last event) are
  deleted, so the runner's ordinary scaling replaces them with standard ones. A busy Spot VM
  is never deleted: it finishes its shard, or is preempted and then replaced;
- from then on, too, the run's shards still queued for Spot VMs are moved to the standard VMs'
  topic at every poll (``move``, a :class:`runner.backends.gcp.shapes.queues.Mover`);
- whether or not the fleet has fallen back, a shard preempted K times is itself re-queued by
  its worker on the standard VMs' topic (``WorkMessage.after_preemption``): it never goes back
  to a Spot VM.

Exactly-once is untouched: a shard's first commit wins whichever VM ran it. The summary
(:meth:`FallbackFleet.summary`) counts the shards that committed on standard VMs and the
VM-seconds each kind was billed, priced by :mod:`runner.observe.prices`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from runner.engine.fleet import Fleet, Instance
from worker.clock import SYSTEM_CLOCK, Clock
from worker.protocol import Event, EventKind
from worker.queue import EventBus

log = logging.getLogger("cflow.runner")

DEFAULT_AFTER_PREEMPTIONS = 3  # K: a shard preempted this often moves the tail to standard VMs
DEFAULT_CAPACITY_GRACE = 120.0  # seconds of refused Spot VMs before giving up on Spot
# Creation errors that mean "no Spot VM to be had here now" (quota, or a zone out of capacity).
CAPACITY_CODES = ("QUOTA_EXCEEDED", "ZONE_RESOURCE_POOL_EXHAUSTED", "RESOURCE_POOL_EXHAUSTED")


class PreemptionTap(EventBus):
    """The run's event bus, passed through, counting each shard's preempted attempts (from
    ``preempted`` events, and from the store's records with :meth:`count`: an attempt counts
    once, however often it is told) and noting which workers said they are idle (and have not
    started anything since)."""

    def __init__(
        self,
        inner: EventBus,
        preemptions: dict[str, int] | None = None,
        idle: set[str] | None = None,
        attempts: dict[str, set[int]] | None = None,
    ):
        self.inner = inner
        self.preemptions: dict[str, int] = {} if preemptions is None else preemptions
        self.idle: set[str] = set() if idle is None else idle
        self.attempts: dict[str, set[int]] = {} if attempts is None else attempts

    def count(self, shard_id: str, attempt: int | None) -> None:
        """One preempted attempt of the shard (None: one whose number is not known)."""
        seen = self.attempts.setdefault(shard_id, set())
        seen.add(attempt if attempt is not None else -len(seen) - 1)
        self.preemptions[shard_id] = len(seen)

    def publish(self, event: Event) -> None:
        self.inner.publish(event)

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        events = self.inner.pull(max_events, timeout)
        for e in events:
            if e.kind == EventKind.PREEMPTED.value and e.shard_id is not None:
                self.count(e.shard_id, e.attempt)
            if e.kind == EventKind.IDLE.value:
                self.idle.add(e.worker)
            elif e.kind in (
                EventKind.STARTED.value,
                EventKind.HEARTBEAT.value,
                EventKind.STOPPED.value,
            ):
                self.idle.discard(e.worker)
        return events

    def close(self) -> None:
        self.inner.close()


@dataclass
class FallbackPolicy:
    """When to stop asking for Spot VMs."""

    after_preemptions: int = DEFAULT_AFTER_PREEMPTIONS
    capacity_grace: float = DEFAULT_CAPACITY_GRACE
    reason: str | None = None  # why the fallback started (None: not started)
    at: float | None = None  # when
    # Called with the reason when the fallback starts, to record it where a runner that
    # resumes the run (`runner watch`) finds it: the counts that started it are gone by then.
    on_start: Callable[[str], None] | None = field(default=None, repr=False)
    _refused_since: float | None = field(default=None, repr=False)

    def update(self, now: float, preemptions: dict[str, int], spot: list[Instance]) -> bool:
        """Whether the fallback is on, after looking at this poll's counts and Spot VMs."""
        if self.reason is not None:
            return True
        worst = max(preemptions.items(), key=lambda kv: kv[1], default=None)
        if worst is not None and worst[1] >= self.after_preemptions:
            return self._start(now, f"shard {worst[0]} was preempted {worst[1]} times")
        refused = [i for i in spot if is_capacity_error(i.error)]
        if not refused:
            self._refused_since = None
            return False
        if self._refused_since is None:
            self._refused_since = now
        if now - self._refused_since >= self.capacity_grace:
            return self._start(now, f"{len(refused)} Spot VMs refused: {refused[0].error}")
        return False

    def _start(self, now: float, reason: str) -> bool:
        self.reason, self.at = reason, now
        log.warning("falling back to standard VMs: %s", reason)
        if self.on_start is not None:
            self.on_start(reason)
        return True

    def resume(self, now: float, reason: str) -> None:
        """The run fell back before this runner watched it (its runner was stopped and
        resumed): stay on standard VMs."""
        if self.reason is None:
            self.reason, self.at = reason, now
            log.info("the run fell back to standard VMs before: %s", reason)


def is_capacity_error(error: str | None) -> bool:
    """A creation error that says Spot capacity (or its quota) is not there."""
    return error is not None and any(code in error for code in CAPACITY_CODES)


@dataclass(frozen=True)
class FallbackSummary:
    """What the fallback did, for the run's summary."""

    reason: str | None
    started_at: float | None
    standard_shards: int  # shards whose committed attempt ran on a standard VM
    standard_vms: int
    spot_vm_seconds: float
    standard_vm_seconds: float
    spot_cost: float | None  # USD, list prices; None when the machine type has no price
    standard_cost: float | None

    def line(self) -> str:
        if self.reason is None:
            return "fallback: not needed (every shard ran on Spot VMs)"
        cost = f", ${self.standard_cost:.2f}" if self.standard_cost is not None else ""
        hours = self.standard_vm_seconds / 3600
        return (
            f"fallback to standard VMs ({self.reason}): {self.standard_shards} shards on "
            f"{self.standard_vms} standard VMs, {hours:.2f} VM-hours{cost}"
        )


class FallbackFleet(Fleet):
    """A Spot fleet and a standard fleet of one shape, as the one fleet the watcher scales.

    Args:
        spot: the Spot group of the run's shape.
        standard: the standard group of the same shape.
        preemptions: shard -> preemptions so far, as a :class:`PreemptionTap` on the run's
            events counts them (the same dict).
        policy: when to fall back.
    """

    def __init__(
        self,
        *,
        spot: Fleet,
        standard: Fleet,
        preemptions: dict[str, int],
        policy: FallbackPolicy | None = None,
        clock: Clock = SYSTEM_CLOCK,
        move: Callable[[], int] | None = None,
        idle: set[str] | None = None,
    ):
        self.spot, self.standard, self.preemptions = spot, standard, preemptions
        self.deletes_by_itself = spot.deletes_by_itself and standard.deletes_by_itself
        self.lists_starting = spot.lists_starting or standard.lists_starting
        self.move = move  # moves the run's queued shards to the standard VMs' queue
        # Workers that said they are idle (a PreemptionTap's set): once the fallback is on, an
        # idle Spot VM will get none of the run's shards (they are queued for standard VMs).
        self.idle: set[str] = set() if idle is None else idle
        self.policy = policy or FallbackPolicy()
        self.clock = clock
        self.standard_names: set[str] = set()  # every standard VM this run had
        self._start = clock.monotonic()
        # VM -> (first, last) time the group listed it: VM-seconds as the runner saw them (an
        # estimate to within a poll; the bill is the truth).
        self.seen: dict[str, tuple[float, float]] = {}

    @property
    def active(self) -> bool:
        return self.policy.reason is not None

    def instances(self) -> list[Instance]:
        spot = self.spot.instances()
        now = self.clock.monotonic() - self._start
        if self.policy.update(now, self.preemptions, spot):
            idle = [
                i
                for i in spot
                if i.status == "starting" or is_capacity_error(i.error) or i.name in self.idle
            ]
            if idle:  # never a running one that may be busy
                self.spot.delete([i.name for i in idle])
                gone = {i.name for i in idle}
                spot = [i for i in spot if i.name not in gone]
            if self.move is not None:
                try:
                    self.move()
                except Exception as exc:  # the next poll tries again
                    log.warning("could not move queued shards to standard VMs: %s", exc)
        standard = self.standard.instances()
        self.standard_names.update(i.name for i in standard)
        for i in [*spot, *standard]:
            if not is_capacity_error(i.error):  # a VM never created is never billed
                first = self.seen.get(i.name, (now, now))[0]
                self.seen[i.name] = (first, now)
        return sorted([*spot, *standard], key=lambda i: i.name)

    def vm_seconds(self) -> tuple[float, float]:
        """(Spot, standard) VM-seconds the runner saw listed."""
        spot = standard = 0.0
        for name, (first, last) in self.seen.items():
            if name in self.standard_names:
                standard += last - first
            else:
                spot += last - first
        return spot, standard

    def grow(self, count: int) -> list[str]:
        if not self.active:
            names = self.spot.grow(count)
        else:
            names = self.standard.grow(count)
            self.standard_names.update(names)
        now = self.clock.monotonic() - self._start
        for name in names:  # billed from the moment it was asked for
            self.seen.setdefault(name, (now, now))
        return names

    def delete(self, names: Iterable[str]) -> None:
        wanted = set(names)
        standard = wanted & self.standard_names
        if standard:
            self.standard.delete(sorted(standard))
        if wanted - standard:
            self.spot.delete(sorted(wanted - standard))

    def wait_empty(self, timeout: float) -> bool:
        deadline = self.clock.monotonic() + timeout
        spot = self.spot.wait_empty(timeout)
        left = max(deadline - self.clock.monotonic(), 0.0)
        return self.standard.wait_empty(left) and spot

    def problems(self) -> list[str]:
        return [*self.spot.problems(), *self.standard.problems()]

    def close(self) -> None:
        self.spot.close()
        self.standard.close()

    def summary(
        self,
        *,
        winners: dict[str, str],
        spot_seconds: float,
        standard_seconds: float,
        machine_type: str,
        prices: object | None = None,
    ) -> FallbackSummary:
        """``winners``: shard -> the worker (VM) whose attempt committed it."""
        from runner.observe.prices import PriceTable, load_prices

        table = prices if isinstance(prices, PriceTable) else load_prices()
        return FallbackSummary(
            reason=self.policy.reason,
            started_at=self.policy.at,
            standard_shards=sum(1 for w in winners.values() if w in self.standard_names),
            standard_vms=len(self.standard_names),
            spot_vm_seconds=spot_seconds,
            standard_vm_seconds=standard_seconds,
            spot_cost=table.cost(machine_type, spot_seconds, spot=True) if spot_seconds else 0.0,
            standard_cost=(
                table.cost(machine_type, standard_seconds, spot=False) if standard_seconds else 0.0
            ),
        )
