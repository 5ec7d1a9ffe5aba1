"""What a simulated run cost: VM lifetimes, attempts, and the shape of the fleet over time."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Fate(StrEnum):
    """How one attempt ended, as the simulator saw it."""

    COMMITTED = "committed"  # its result.json won
    DISCARDED = "discarded"  # succeeded after another attempt had committed
    FAILED = "failed"  # the task exited non-zero or timed out
    PREEMPTED = "preempted"  # its VM was preempted or deleted; the worker nacked it
    LOST = "lost"  # its VM went before the worker could nack: the lease lapses
    CRASHED = "crashed"  # it took its worker process down


@dataclass(slots=True)
class VmSpan:
    """One incarnation of a VM: billed from creation until deleted or preempted."""

    name: str
    created: float
    gone: float | None = None
    preempted: bool = False
    busy: list[tuple[float, float]] = field(default_factory=list)  # attempt intervals


@dataclass(slots=True)
class AttemptSpan:
    shard: str
    vm: int  # index into Ledger.vms
    start: float
    end: float
    fate: Fate


@dataclass(frozen=True, slots=True)
class Sample:
    t: float
    vms: int  # VMs billed now
    busy: int  # VMs running at least one attempt
    backlog: int  # messages waiting for a worker (queued, or backing off before redelivery)


@dataclass
class Ledger:
    vms: list[VmSpan] = field(default_factory=list)
    attempts: list[AttemptSpan] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def open_vm(self, name: str, now: float) -> int:
        self.vms.append(VmSpan(name, now))
        return len(self.vms) - 1

    def close_vm(self, vm: int, now: float, *, preempted: bool = False) -> None:
        span = self.vms[vm]
        if span.gone is None:
            span.gone = now
            span.preempted = preempted

    def attempt(self, shard: str, vm: int, start: float, end: float, fate: Fate) -> None:
        self.attempts.append(AttemptSpan(shard, vm, start, end, fate))
        self.vms[vm].busy.append((start, end))

    # -- totals --------------------------------------------------------------------------------

    def billed_seconds(self, end: float) -> float:
        return sum((v.gone if v.gone is not None else end) - v.created for v in self.vms)

    def work_seconds(self, *fates: Fate) -> float:
        chosen = set(fates) or set(Fate)
        return sum(a.end - a.start for a in self.attempts if a.fate in chosen)

    def busy_seconds(self, start: float = float("-inf")) -> float:
        """VM-seconds with at least one attempt running, from ``start`` on."""
        return sum(_union(v.busy, start) for v in self.vms)

    def billed_after(self, start: float, end: float) -> float:
        return sum(
            max(0.0, (v.gone if v.gone is not None else end) - max(v.created, start))
            for v in self.vms
        )

    def idle_after(self, start: float, end: float) -> float:
        """Billed VM-seconds without an attempt running, from ``start`` on."""
        return self.billed_after(start, end) - self.busy_seconds(start)

    def count(self, fate: Fate) -> int:
        return sum(1 for a in self.attempts if a.fate is fate)


def _union(intervals: list[tuple[float, float]], start: float) -> float:
    total, reach = 0.0, start
    for lo, hi in sorted(intervals):
        lo = max(lo, reach)
        if hi > lo:
            total += hi - lo
            reach = hi
    return total
