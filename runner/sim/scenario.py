"""One simulated run, end to end: submit, the runner's own watch loop, drain, and the bill.

:func:`simulate` submits a run with :func:`runner.engine.runs.create_run` into an in-memory store
and a simulated Pub/Sub subscription, then hands control to
:meth:`runner.engine.watch.Watcher.watch` with a :class:`~runner.sim.clock.SimClock`: every
``clock.sleep`` between the runner's polls runs the simulated fleet up to the next poll. When the
watcher says the run is done, the runner drains the fleet as ``runner submit`` does, and the
simulation goes on until the last VM is gone.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner.backends.gcp.shapes.fallback import FallbackFleet, FallbackPolicy, PreemptionTap
from runner.engine import runs
from runner.engine.fleet import Fleet
from runner.engine.shards import from_count
from runner.engine.watch import Watcher
from runner.sim.clock import RunnerMeter, SimClock
from runner.sim.fleet import SimFleet
from runner.sim.ledger import Fate, Ledger, Sample
from runner.sim.pubsub import RETRY_MIN_BACKOFF, SimEvents, SimPubSub
from runner.sim.store import MemoryStore
from runner.sim.worker import SCRATCH
from runner.sim.workload import Shards, Workload
from runner.sim.world import VmModel, World
from worker import defaults
from worker.agent.agent import AgentConfig
from worker.protocol import Manifest, RunOptions
from worker.queue import EventBus, WorkQueue
from worker.tempdirs import temp_folder

QueueFactory = Callable[[SimClock], WorkQueue]
TASK_PY = "def run(shard):\n    pass\n"  # bundled for the manifest; the simulator runs nothing
STANDARD_PREFIX = "cflow-std"  # the standard group's VMs (the fallback's)
DRAIN_TIMEOUT = 30.0  # seconds runner submit waits for the fleet to go after the run


@dataclass(frozen=True)
class Scenario:
    """A run to simulate: the work, the fleet and the runner's settings."""

    name: str
    workload: Workload
    max_workers: int
    vm: VmModel = field(default_factory=VmModel)
    slots: int = 1
    max_attempts: int = defaults.MAX_ATTEMPTS
    timeout: float = defaults.ATTEMPT_TIMEOUT
    idle_timeout: float | None = defaults.IDLE_TIMEOUT
    poll_seconds: float = defaults.WATCH_POLL_SECONDS
    reconcile_seconds: float = defaults.RECONCILE_SECONDS
    duplicate_rate: float = 0.0  # Pub/Sub redelivers this share of acked messages anyway
    speculate: bool = False
    seed: int = 0
    horizon: float = 48 * 3600.0  # virtual seconds before the simulation gives up
    trace_every: int = 0  # tracemalloc every n-th poll of the runner (0: never)
    # --fallback standard: a second group of standard VMs (no preemption, their own quota)
    # takes over once a shard was preempted ``fallback_after`` times or Spot VMs are refused.
    fallback: bool = False
    fallback_after: int = 3
    capacity_grace: float = 120.0
    standard_quota_vms: int | None = None


@dataclass
class Result:
    scenario: Scenario
    makespan: float  # submit until the runner saw every shard committed or failed
    last_commit: float
    zero_at: float  # the last VM gone
    lower_bound: float  # max(median VM ready time + longest shard, total work / parallelism)
    redo_bound: float  # also: no shard ends before its last interrupted attempt + a full rerun
    billed: float  # VM-seconds
    work: float  # VM-seconds of attempts running, whatever their fate
    useful: float  # VM-seconds of the attempts that committed
    drained_at: float
    idle_after_drain: float  # billed VM-seconds with nothing running, after the drain
    shards: int
    committed: int
    failed: int
    lost: list[str]  # shards neither committed nor failed: must be empty
    double_commits: list[str]  # shards with more than one winning attempt: must be empty
    fates: dict[str, int]
    fleet: dict[str, int]
    queue: dict[str, int]
    samples: list[Sample]
    ledger: Ledger
    meter: RunnerMeter | None
    store_lists: int
    store_objects: int
    store_keys_listed: int
    polls: int
    wall_seconds: float
    standard_billed: float = 0.0  # VM-seconds of standard VMs (the fallback's group)
    standard_shards: int = 0  # shards whose committed attempt ran on a standard VM
    fallback_reason: str | None = None
    fallback_at: float | None = None

    @property
    def spot_billed(self) -> float:
        return self.billed - self.standard_billed

    @property
    def ratio(self) -> float:
        return self.makespan / self.lower_bound

    @property
    def efficiency(self) -> float:
        return self.work / self.billed if self.billed else 0.0

    @property
    def idle_fraction(self) -> float:
        return self.idle_after_drain / self.billed if self.billed else 0.0


@dataclass
class _Rig:
    """The simulated world of one run, and what the runner sees of it."""

    clock: SimClock
    meter: RunnerMeter
    store: MemoryStore
    queue: WorkQueue
    shards: Shards
    ledger: Ledger
    world: World
    fleet: Fleet  # what the runner scales: the Spot group, or the fallback over both groups
    fleets: list[SimFleet]  # every group of simulated VMs
    events: EventBus  # what the runner's watcher reads


def simulate(scenario: Scenario, *, queue_factory: QueueFactory | None = None) -> Result:
    """Run one scenario to the end and account for every shard and VM-second."""
    wall = time.perf_counter()
    sc = scenario
    rig = _rig(sc, queue_factory)
    manifest = _submit(sc, rig)
    shards = rig.shards
    parallel = sc.max_workers * sc.slots
    lower_bound = max(sc.vm.ready_seconds + shards.longest_seconds, shards.total_seconds / parallel)
    _sample_every(rig.world, rig.fleets, max(1.0, lower_bound / 300))
    makespan = _watch(sc, rig, manifest)
    rig.clock.run_while(lambda: any(f.size > 0 for f in rig.fleets), step=1.0)
    return _result(sc, rig, manifest.run_id, makespan, lower_bound, wall)


def _rig(sc: Scenario, queue_factory: QueueFactory | None) -> _Rig:
    """The clock, store, queue, workload and fleet(s) of a scenario, before anything runs.

    The order of the draws from the scenario's seed is part of the result: keep it."""
    meter = RunnerMeter(trace_every=sc.trace_every)
    clock = SimClock(horizon=sc.horizon, meter=meter)
    rng = random.Random(sc.seed)
    store = MemoryStore()
    queue = (
        queue_factory(clock)
        if queue_factory is not None
        else SimPubSub(clock, duplicate_rate=sc.duplicate_rate, rng=random.Random(rng.random()))
    )
    events = SimEvents(clock)
    shards = Shards(sc.workload, random.Random(rng.random()))
    ledger = Ledger()
    agent = AgentConfig(name="", scratch=SCRATCH, slots=sc.slots, idle_timeout=sc.idle_timeout)
    world = World(clock, queue, store, events, shards, ledger, rng, sc.vm, agent)
    spot = SimFleet(world)
    fleet: Fleet = spot
    standard: SimFleet | None = None
    run_events: EventBus = events
    if sc.fallback:
        model = dataclasses.replace(sc.vm, preempt_per_hour=0.0, quota_vms=sc.standard_quota_vms)
        standard = SimFleet(world, name_prefix=STANDARD_PREFIX, model=model)
        tap = PreemptionTap(events)
        policy = FallbackPolicy(
            after_preemptions=sc.fallback_after, capacity_grace=sc.capacity_grace
        )
        fleet = FallbackFleet(
            spot=spot, standard=standard, preemptions=tap.preemptions, policy=policy, clock=clock
        )
        run_events = tap
    fleets = [f for f in (spot, standard) if f is not None]
    return _Rig(clock, meter, store, queue, shards, ledger, world, fleet, fleets, run_events)


def _submit(sc: Scenario, rig: _Rig) -> Manifest:
    """Submit the run as ``runner submit`` does, with a task that is bundled but never runs."""
    with temp_folder("sim") as tmp:
        task = Path(tmp) / "task"
        task.mkdir()
        (task / "task.py").write_text(TASK_PY)
        return runs.create_run(
            store=rig.store,
            queue=rig.queue,
            task_dir=task,
            shards=from_count(sc.workload.shards),
            options=RunOptions(max_attempts=sc.max_attempts, timeout=sc.timeout),
            clock=rig.clock,
        )


def _watch(sc: Scenario, rig: _Rig, manifest: Manifest) -> float:
    """The runner's watch loop until the run is done, then its drain of the fleet; returns when
    the watcher saw the run done (the makespan)."""
    watcher = Watcher(
        manifest=manifest,
        store=rig.store,
        queue=rig.queue,
        events=rig.events,
        fleet=rig.fleet,
        max_workers=sc.max_workers,
        slots=sc.slots,
        clock=rig.clock,
        reconcile_seconds=sc.reconcile_seconds,
        speculate=sc.speculate,
    )
    rig.meter.runner_resumes()
    watcher.watch(poll_seconds=sc.poll_seconds)
    makespan = rig.clock.now
    watcher.drain_fleet(timeout=DRAIN_TIMEOUT)
    rig.meter.runner_pauses(rig.clock.now)
    rig.clock.meter = None  # the runner is done: nothing more of it to meter
    return makespan


def _result(
    sc: Scenario, rig: _Rig, run_id: str, makespan: float, lower_bound: float, wall: float
) -> Result:
    """Account for the finished simulation: every shard's end, every VM-second, the runner's
    cost. ``wall`` is when the simulation started (``time.perf_counter``)."""
    end, ledger, store, fleet = rig.clock.now, rig.ledger, rig.store, rig.fleet
    committed = runs.committed(store, run_id)
    failed = runs.failed(store, run_id) - committed
    ids = {str(m["id"]) for m in _shard_dicts(sc.workload.shards)}
    winners, on_standard = _winners(ledger)
    policy_seen = fleet.policy if isinstance(fleet, FallbackFleet) else None
    commits = [a.end for a in ledger.attempts if a.fate is Fate.COMMITTED]
    pubsub = rig.queue if isinstance(rig.queue, SimPubSub) else None
    drained = pubsub.drained_at if pubsub is not None and pubsub.drained_at is not None else end
    return Result(
        scenario=sc,
        makespan=makespan,
        last_commit=max(commits, default=0.0),
        zero_at=end,
        lower_bound=lower_bound,
        redo_bound=_redo_bound(ledger, rig.shards, sc.workload.shards, lower_bound),
        billed=ledger.billed_seconds(end),
        work=ledger.busy_seconds(),
        useful=ledger.work_seconds(Fate.COMMITTED),
        drained_at=drained,
        idle_after_drain=ledger.idle_after(drained, end),
        shards=sc.workload.shards,
        committed=len(committed),
        failed=len(failed),
        lost=sorted(ids - committed - failed),
        double_commits=sorted(s for s, n in winners.items() if n > 1),
        fates={f.value: ledger.count(f) for f in Fate},
        fleet=_counts(rig.fleets),
        queue=dict(pubsub.counts) if pubsub is not None else {},
        samples=ledger.samples,
        ledger=ledger,
        meter=rig.meter,
        store_lists=store.list_calls,
        store_keys_listed=store.keys_listed,
        store_objects=len(store),
        polls=rig.meter.polls,
        wall_seconds=time.perf_counter() - wall,
        standard_billed=_standard_billed(ledger, end),
        standard_shards=len(on_standard),
        fallback_reason=policy_seen.reason if policy_seen else None,
        fallback_at=policy_seen.at if policy_seen else None,
    )


def _winners(ledger: Ledger) -> tuple[dict[str, int], set[str]]:
    """Committed attempts per shard, and the shards committed on a standard VM."""
    winners: dict[str, int] = {}
    on_standard = set()
    for a in ledger.attempts:
        if a.fate is Fate.COMMITTED:
            winners[a.shard] = winners.get(a.shard, 0) + 1
            if ledger.vms[a.vm].name.startswith(STANDARD_PREFIX):
                on_standard.add(a.shard)
    return winners, on_standard


def _standard_billed(ledger: Ledger, end: float) -> float:
    """VM-seconds of the standard group's VMs, those still up counted until ``end``."""
    return sum(
        (v.gone if v.gone is not None else end) - v.created
        for v in ledger.vms
        if v.name.startswith(STANDARD_PREFIX)
    )


def _counts(fleets: list[SimFleet]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in fleets:
        for k, n in f.counts.items():
            out[k] = out.get(k, 0) + n
    return out


def _redo_bound(ledger: Ledger, shards: Shards, count: int, lower_bound: float) -> float:
    """The lower bound, knowing when preemptions struck: a shard whose attempt was cut off at
    ``t`` cannot commit before ``t`` plus Pub/Sub's minimum retry backoff plus a full rerun,
    even with an idle worker waiting for it."""
    index = {str(s["id"]): int(str(s["index"])) for s in _shard_dicts(count)}
    won = {a.shard: a.start for a in ledger.attempts if a.fate is Fate.COMMITTED}
    bound = lower_bound
    for a in ledger.attempts:
        if a.fate in (Fate.PREEMPTED, Fate.LOST) and won.get(a.shard, -1.0) >= a.end:
            bound = max(bound, a.end + RETRY_MIN_BACKOFF + shards.base[index[a.shard]])
    return bound


def _shard_dicts(count: int) -> list[dict[str, object]]:
    return [s.to_dict() for s in from_count(count)]


def _sample_every(world: World, fleets: list[SimFleet], seconds: float) -> None:
    queue = world.queue

    def sample() -> None:
        backlog = queue.backlog if isinstance(queue, SimPubSub) else 0
        billed = sum(f.billed() for f in fleets)
        busy = sum(f.busy() for f in fleets)
        world.ledger.samples.append(Sample(world.clock.now, billed, busy, backlog))
        world.clock.after(seconds, sample)

    world.clock.at(0.0, sample)
