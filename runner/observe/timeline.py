"""What happened in a run, read back from the store: the data of ``runner report``.

One **lane** per worker that ran an attempt of the run, each attempt a **bar** from its start to
its end coloured by outcome (succeeded, failed, preempted, discarded; running while it still is;
lost when its worker died without recording an end),
the **queue depth** (shards waiting for a worker) over time, and a **summary**: billed VM-seconds,
task seconds, efficiency and the estimated cost.

Billed time per worker comes from ``fleet/<worker>/lifetime.json`` when the agent wrote one
(``started_at`` to ``stopped_at``, or ``last_seen`` while it is alive); otherwise from the worker's
first attempt start to its last attempt end, which misses boot and idle time, and the summary says
which source each worker used. Times in the data are seconds since the run was created.

Only the :class:`worker.store.Store` interface is used, so it works on every backend.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from runner.engine.reports import ShardReport, shard_reports
from runner.engine.runs import load_manifest
from runner.observe.prices import PriceTable
from worker.errors import NotFound
from worker.protocol import AttemptState, Manifest, RunState, ShardState
from worker.store import Store

OUTCOMES = ("succeeded", "failed", "preempted", "discarded", "running", "lost")
# "lost": still "running" in the store although the run is over: its worker died (SIGKILL, a
# vanished VM) before it could record an end, and the shard ran again elsewhere.
LIFETIME = "lifetime"  # billing source: the agent's lifetime record
ATTEMPTS = "attempts"  # billing source: first attempt start to last attempt end


def lifetime_key(worker: str) -> str:
    """Where the agent records a worker's lifetime in the store."""
    return f"fleet/{worker}/lifetime.json"


@dataclass(frozen=True)
class Bar:
    """One attempt on a worker's lane."""

    shard_id: str
    attempt: int
    start: float
    end: float
    outcome: str  # one of OUTCOMES
    slot: int = 0  # row inside the lane, so a worker's concurrent attempts do not overlap
    reason: str | None = None

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 0.0)


@dataclass(frozen=True)
class Lane:
    """One worker: its attempts and the span it was billed for."""

    worker: str
    bars: list[Bar]
    billed_start: float
    billed_end: float
    billing: str  # LIFETIME or ATTEMPTS
    machine_type: str | None = None
    spot: bool = True
    cost: float | None = None  # USD, None when the machine type has no price

    @property
    def billed_seconds(self) -> float:
        return max(self.billed_end - self.billed_start, 0.0)

    @property
    def slots(self) -> int:
        return 1 + max((b.slot for b in self.bars), default=0)


@dataclass(frozen=True)
class Summary:
    shards: int
    shard_states: dict[str, int]
    attempts: dict[str, int]  # attempts per outcome
    wall_seconds: float  # run created to its last attempt end
    billed_vm_seconds: float
    task_seconds: float  # every attempt, whatever its outcome
    committed_seconds: float  # the attempts whose outputs were kept
    efficiency: float | None  # committed task seconds per billed slot-second
    estimated_cost: float | None  # USD; None when no worker's machine type has a price
    cost_note: str
    billing_note: str


@dataclass(frozen=True)
class Timeline:
    run_id: str
    task_name: str
    created_at: float  # epoch seconds; every other time is relative to this
    slots: int
    lanes: list[Lane]
    queue: list[tuple[float, int]]  # (time, shards waiting) at each change
    summary: Summary
    generated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for lane, raw in zip(self.lanes, data["lanes"], strict=True):
            raw["billed_seconds"] = lane.billed_seconds
        data["queue"] = [list(point) for point in self.queue]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


def build_timeline(
    store: Store,
    run_id: str,
    *,
    prices: PriceTable | None = None,
    machine_type: str | None = None,
    now: float | None = None,
) -> Timeline:
    """Read a run's attempts (and its workers' lifetimes) and lay them out.

    Args:
        machine_type: what to price workers whose lifetime record names none (local workers).
        now: the end of bars still running (default: the current time).
    """
    manifest = load_manifest(store, run_id)
    reports = shard_reports(store, run_id)
    now = time.time() if now is None else now
    return lay_out(
        manifest,
        reports,
        lifetimes=_lifetimes(store, {a.worker for r in reports for a in r.attempts}),
        prices=prices or PriceTable(),
        machine_type=machine_type,
        now=now,
    )


def _lifetimes(store: Store, workers: set[str]) -> dict[str, dict[str, Any]]:
    found = {}
    for worker in sorted(workers):
        try:
            record = json.loads(store.get(lifetime_key(worker)))
        except (NotFound, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("started_at"), int | float):
            found[worker] = record
    return found


def lay_out(
    manifest: Manifest,
    reports: list[ShardReport],
    *,
    lifetimes: dict[str, dict[str, Any]],
    prices: PriceTable,
    machine_type: str | None,
    now: float,
) -> Timeline:
    """The timeline of already-read records (pure: the part unit tests drive)."""
    t0 = manifest.created_at
    over = manifest.state != RunState.ACTIVE.value
    if over:  # a finished or cancelled run's picture ends at its last recorded moment
        now = min(now, _last_moment(reports, t0))
    per_worker: dict[str, list[Bar]] = {}
    for report in reports:
        for status in report.attempts:
            end = status.finished_at if status.finished_at is not None else now
            outcome = status.state if status.state in OUTCOMES else AttemptState.FAILED.value
            if outcome == AttemptState.RUNNING.value and over:
                outcome = "lost"
            per_worker.setdefault(status.worker, []).append(
                Bar(
                    shard_id=report.id,
                    attempt=status.attempt,
                    start=status.started_at - t0,
                    end=end - t0,
                    outcome=outcome,
                    reason=status.reason,
                )
            )
    lanes = []
    for worker, all_bars in per_worker.items():
        runs_of = _incarnations(all_bars)
        for n, bars in enumerate(runs_of, 1):
            name = worker if len(runs_of) == 1 else f"{worker} ({n})"
            record = lifetimes.get(worker)
            if record is not None and min(b.start for b in bars) + t0 < record["started_at"]:
                record = None  # an earlier process under the same name: its record is gone
            lanes.append(_lane(name, _assign_slots(bars), record, prices, machine_type, t0, now))
    lanes.sort(key=lambda lane: (min(b.start for b in lane.bars), lane.worker))
    queue = _queue_depth(reports, t0, now)
    return Timeline(
        run_id=manifest.run_id,
        task_name=manifest.task_name,
        created_at=t0,
        slots=manifest.run_options.slots,
        lanes=lanes,
        queue=queue,
        summary=_summary(manifest, reports, lanes, prices),
    )


def _last_moment(reports: list[ShardReport], t0: float) -> float:
    moments = [t0]
    for report in reports:
        moments += [a.finished_at or a.started_at for a in report.attempts]
        if report.result is not None:
            moments.append(report.result.finished_at)
        if report.failure is not None:
            moments.append(report.failure.at)
    return max(moments)


def _incarnations(bars: list[Bar]) -> list[list[Bar]]:
    """Split one worker name's attempts where the worker stopped: a preempted attempt means its
    agent was stopping, so a later attempt under the same name is a new process (local workers
    reuse free names) and gets a lane of its own."""
    groups: list[list[Bar]] = [[]]
    stopped_at: float | None = None
    for bar in sorted(bars, key=lambda b: (b.start, b.end)):
        if stopped_at is not None and bar.start >= stopped_at:
            groups.append([])
            stopped_at = None
        groups[-1].append(bar)
        if bar.outcome == AttemptState.PREEMPTED.value:
            stopped_at = max(stopped_at or bar.end, bar.end)
    return groups


def _lane(
    name: str,
    bars: list[Bar],
    record: dict[str, Any] | None,
    prices: PriceTable,
    machine_type: str | None,
    t0: float,
    now: float,
) -> Lane:
    if record is not None:
        stopped = record.get("stopped_at") or record.get("last_seen") or now
        start, end, billing = float(record["started_at"]) - t0, float(stopped) - t0, LIFETIME
        start = max(start, 0.0)  # time before the run was paid for by something else
        kind = record.get("machine_type") or machine_type
        spot = record.get("provisioning", "spot") != "standard"
    else:
        start, end = min(b.start for b in bars), max(b.end for b in bars)
        billing, kind, spot = ATTEMPTS, machine_type, True
    cost = prices.cost(kind, end - start, spot=spot) if kind else None
    return Lane(name, bars, start, end, billing, kind, spot, cost)


def _assign_slots(bars: list[Bar]) -> list[Bar]:
    """Put overlapping attempts of one worker on separate rows (fewest rows, by start)."""
    rows: list[float] = []  # end of the last bar on each row
    placed = []
    for bar in sorted(bars, key=lambda b: (b.start, b.end)):
        slot = next((i for i, end in enumerate(rows) if end <= bar.start), len(rows))
        if slot == len(rows):
            rows.append(bar.end)
        else:
            rows[slot] = bar.end
        placed.append(
            Bar(bar.shard_id, bar.attempt, bar.start, bar.end, bar.outcome, slot, bar.reason)
        )
    return placed


def _queue_depth(reports: list[ShardReport], t0: float, now: float) -> list[tuple[float, int]]:
    """Shards waiting for a worker over time: from the run's start until each shard is done
    (committed or failed for good), minus the spans when one of its attempts was running."""
    deltas: dict[float, int] = {}

    def add(start: float, end: float) -> None:
        if end > start:
            deltas[start] = deltas.get(start, 0) + 1
            deltas[end] = deltas.get(end, 0) - 1

    for report in reports:
        spans = sorted(
            (a.started_at - t0, (a.finished_at if a.finished_at is not None else now) - t0)
            for a in report.attempts
        )
        if report.result is not None:
            done = report.result.finished_at - t0
        elif report.state is ShardState.FAILED:
            done = max((end for _, end in spans), default=0.0)
        else:
            done = now - t0
        cursor = 0.0
        for start, end in spans:
            add(cursor, min(start, done))
            cursor = max(cursor, end)
        add(cursor, done)
    depth = 0
    points: list[tuple[float, int]] = []
    for at in sorted(deltas):
        depth += deltas[at]
        if points and points[-1][0] == at:
            points[-1] = (at, depth)
        else:
            points.append((at, depth))
    return points or [(0.0, 0)]


def _summary(
    manifest: Manifest, reports: list[ShardReport], lanes: list[Lane], prices: PriceTable
) -> Summary:
    bars = [b for lane in lanes for b in lane.bars]
    attempts = {o: sum(1 for b in bars if b.outcome == o) for o in OUTCOMES}
    states = {s.value: sum(1 for r in reports if r.state is s) for s in ShardState}
    if cached := sum(1 for r in reports if r.cached_from):  # reused from earlier runs, not run
        states["cached"] = cached
    billed = sum(lane.billed_seconds for lane in lanes)
    task = sum(b.seconds for b in bars)
    committed = sum(b.seconds for b in bars if b.outcome == AttemptState.SUCCEEDED.value)
    slots = manifest.run_options.slots
    efficiency = committed / (billed * slots) if billed > 0 else None
    priced = [lane for lane in lanes if lane.cost is not None]
    unpriced = sorted({lane.machine_type or "unknown" for lane in lanes if lane.cost is None})
    if not lanes:
        cost, cost_note = None, "no attempts yet"
    elif not priced:
        cost = None
        cost_note = (
            "not estimated: no machine type known for these workers (local run?);"
            " `runner report --machine-type TYPE` prices them as that VM"
            if unpriced == ["unknown"]
            else f"not estimated: no price for {', '.join(unpriced)} (add it with --prices FILE)"
        )
    else:
        cost = sum(lane.cost or 0.0 for lane in priced)
        kinds = sorted(
            {f"{lane.machine_type} {'Spot' if lane.spot else 'standard'}" for lane in priced}
        )
        cost_note = f"{', '.join(kinds)} at {prices.origin}"
        if unpriced:
            cost_note += f"; {len(lanes) - len(priced)} workers unpriced ({', '.join(unpriced)})"
    from_lifetime = sum(1 for lane in lanes if lane.billing == LIFETIME)
    if from_lifetime == len(lanes):
        billing_note = "billed time from the workers' lifetime records"
    elif from_lifetime == 0:
        billing_note = (
            "billed time from each worker's first attempt start to its last attempt end"
            " (no lifetime records: boot and idle time not counted)"
        )
    else:
        billing_note = (
            f"billed time from lifetime records for {from_lifetime} workers, from attempt spans"
            f" for {len(lanes) - from_lifetime}"
        )
    wall = max((b.end for b in bars), default=0.0)
    return Summary(
        shards=manifest.shard_count,
        shard_states=states,
        attempts=attempts,
        wall_seconds=wall,
        billed_vm_seconds=billed,
        task_seconds=task,
        committed_seconds=committed,
        efficiency=efficiency,
        estimated_cost=cost,
        cost_note=cost_note,
        billing_note=billing_note,
    )
