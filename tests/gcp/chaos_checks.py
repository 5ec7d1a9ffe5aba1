"""What the chaos soak (:mod:`tests.gcp.chaos`) checks after each seed, and what it measures.

- Exactly once, from the commit records in the bucket: one ``result.json`` per shard (none for a
  shard made to fail, which has its ``failed.json``), the committing attempt not recorded
  discarded, failed or preempted, no other attempt recorded succeeded, and each index once in
  the run's combined output.
- Every run finished: its manifest ``finished``, its runner's exit status 0 (1 where a shard was
  made to fail).
- Idle VM-seconds: each VM's lifetimes (:class:`Lifetimes`, from its process's start to its
  exit; a recreated VM keeps its name) less the union of its attempts' times.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.gcp.fake_compute import FakeCompute, Spawn
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import AttemptState, Layout, Manifest, RunState

if TYPE_CHECKING:
    from tests.gcp.chaos import Plan, Scenario

Spans = dict[str, list[tuple[float, float]]]  # VM name -> its (start, end) intervals


@dataclass
class SeedResult:
    """One seed's outcome: the figures the bench prints and whatever the checks found."""

    seed: int
    plan: Plan
    seconds: float = 0.0
    drain: float = 0.0  # seconds from both runs' end to every group at zero
    vms: int = 0  # VM processes started (recreations included)
    vm_seconds: float = 0.0
    busy_seconds: float = 0.0
    max_idle: float = 0.0  # the most idle seconds of one VM
    faults: int = 0  # calls the fault plan failed
    attempts: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def idle_seconds(self) -> float:
        return self.vm_seconds - self.busy_seconds

    @property
    def ok(self) -> bool:
        return not self.problems


class Lifetimes:
    """Every VM process's start and exit, by VM name (a recreated VM keeps its name)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._lock = threading.Lock()
        self.spans: dict[str, list[list[float | None]]] = {}
        self.procs: dict[str, subprocess.Popen[Any]] = {}

    def track(self, name: str, proc: subprocess.Popen[Any]) -> subprocess.Popen[Any]:
        span: list[float | None] = [self.clock(), None]
        with self._lock:
            self.spans.setdefault(name, []).append(span)
            self.procs[name] = proc

        def ended() -> None:
            proc.wait()
            span[1] = self.clock()

        threading.Thread(target=ended, daemon=True).start()
        return proc

    def wrap(self, spawn: Spawn) -> Spawn:
        return lambda name: self.track(name, spawn(name))

    def wrap_shaped(
        self, spawn: Callable[[str, dict[str, str]], subprocess.Popen[Any]]
    ) -> Callable[[str, dict[str, str]], subprocess.Popen[Any]]:
        return lambda name, metadata: self.track(name, spawn(name, metadata))

    def closed(self, now: float) -> Spans:
        """Each VM's lifetimes, one still running counted to ``now``."""
        with self._lock:
            return {
                name: [
                    (float(s[0] or now), float(s[1] if s[1] is not None else now)) for s in spans
                ]
                for name, spans in self.spans.items()
            }


def overlap(spans: list[tuple[float, float]], busy: list[tuple[float, float]]) -> float:
    """Seconds of ``spans`` covered by the union of ``busy``."""
    merged: list[list[float]] = []
    for start, end in sorted(busy):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return sum(
        max(0.0, min(end, b_end) - max(start, b_start))
        for start, end in spans
        for b_start, b_end in merged
    )


def _json(store: GcsStore, key: str) -> dict[str, Any] | None:
    with contextlib.suppress(Exception):
        data: dict[str, Any] = json.loads(store.get(key))
        return data
    return None


def check_run(s: Scenario, name: str, code: int | None, stderr: str) -> list[str]:
    """What is wrong with one run: its runner's exit, its manifest, its commit records."""
    run, plan = s.run_ids[name], s.plan
    poison = plan.poison if name == "plain" else None
    problems = []
    want_code = 0 if poison is None else 1
    if code != want_code:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        problems.append(f"{name}: runner exited {code}, not {want_code}: {tail}")
    manifest = _json(s.store, Layout.manifest(run))
    if manifest is None or Manifest.from_dict(manifest).state != RunState.FINISHED:
        problems.append(f"{name}: run not finished ({manifest and manifest.get('state')})")
    keys = list(s.store.list(Layout.shards_prefix(run)))
    results = {k.split("/")[3]: _json(s.store, k) for k in keys if k.endswith("/result.json")}
    failed = {k.split("/")[3] for k in keys if k.endswith("/failed.json")}
    statuses: dict[str, dict[int, str]] = {}
    for key in keys:
        if key.endswith("/status.json") and (status := _json(s.store, key)):
            statuses.setdefault(status["shard_id"], {})[status["attempt"]] = status["state"]
    shard_ids = [
        json.loads(line)["id"] for line in s.store.get(Layout.shard_list(run)).splitlines()
    ]
    want_failed = {shard_ids[poison]} if poison is not None else set()
    if failed != want_failed:
        problems.append(f"{name}: failed shards {sorted(failed)}, expected {sorted(want_failed)}")
    for shard in shard_ids:
        result, tries = results.get(shard), statuses.get(shard, {})
        if shard in want_failed:
            if result is not None:
                problems.append(f"{name}: shard {shard} made to fail committed")
            continue
        if result is None:
            problems.append(f"{name}: shard {shard} never committed")
            continue
        won = result["attempt"]
        if tries.get(won) in (AttemptState.DISCARDED, AttemptState.FAILED, AttemptState.PREEMPTED):
            problems.append(
                f"{name}: shard {shard}'s commit is attempt {won}, recorded {tries[won]}"
            )
        others = [a for a, state in tries.items() if a != won and state == AttemptState.SUCCEEDED]
        if others:
            problems.append(f"{name}: shard {shard} committed by {won}, yet {others} succeeded")
    problems += _check_combined(s, name, run, len(shard_ids) - len(want_failed), poison)
    return problems


def _check_combined(s: Scenario, name: str, run: str, count: int, poison: int | None) -> list[str]:
    key = Layout.combined(run) + "index.txt"
    try:
        lines = s.store.get(key).decode().split()
    except Exception as exc:  # whatever keeps it from being read is the finding
        return [f"{name}: no combined output ({type(exc).__name__})"]
    want = [i for i in range(s.plan.shards) if i != poison]
    got = sorted(int(line) for line in lines)
    return [] if got == want else [f"{name}: combined indices {got}, expected {want}"]


def _attempt_spans(s: Scenario, now: float) -> Spans:
    """Each VM's attempts, start to end; one that never ended counts until its VM did. The
    winner's ``result.json`` stands for its ``status.json``, which stays ``running``."""
    ended = {vm: max(e for _, e in spans) for vm, spans in s.lifetimes.closed(now).items()}
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for run in s.run_ids.values():
        for key in s.store.list(Layout.shards_prefix(run)):
            if key.endswith(("/status.json", "/result.json")) and (record := _json(s.store, key)):
                attempt = (run, record["shard_id"], int(record["attempt"]))
                if key.endswith("/result.json") or attempt not in records:
                    records[attempt] = record
    spans: dict[str, list[tuple[float, float]]] = {}
    for record in records.values():
        vm, start = str(record.get("worker", "")), float(record["started_at"])
        end = record.get("finished_at") or ended.get(vm, now)
        spans.setdefault(vm, []).append((start, float(end)))
    return spans


def measure(s: Scenario, result: SeedResult, bound: float) -> None:
    """VM-seconds, busy and idle, from the VMs' lifetimes and their attempts' times."""
    now = time.time()
    tally(result, s.lifetimes.closed(now), _attempt_spans(s, now), bound)


def tally(result: SeedResult, lives: Spans, busy: Spans, bound: float) -> None:
    """Add up each VM's lifetimes and the part of them its attempts cover; a VM idle past
    ``bound`` seconds is a problem."""
    result.vms += sum(len(spans) for spans in lives.values())
    result.attempts += sum(len(spans) for spans in busy.values())
    for vm, spans in lives.items():
        alive = sum(end - start for start, end in spans)
        used = overlap(spans, busy.get(vm, []))
        result.vm_seconds += alive
        result.busy_seconds += used
        result.max_idle = max(result.max_idle, alive - used)
        if alive - used > bound:
            result.problems.append(f"VM {vm} idle {alive - used:.0f} s (bound {bound:.0f})")


def drained(fake: FakeCompute) -> bool:
    return not fake.live() and all(fake.is_empty(g) for g in list(fake.groups))
