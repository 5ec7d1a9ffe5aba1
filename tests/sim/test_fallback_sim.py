"""--fallback standard in the fleet simulation: the real watch loop and scale policy, a Spot
group and a standard group; every shard still commits exactly once and the fleet ends at zero."""

from __future__ import annotations

from runner.backends.gcp.shapes.fallback import FallbackPolicy, PreemptionTap, is_capacity_error
from runner.engine.fleet import Instance
from runner.sim import Result, Scenario, VmModel, Workload, simulate
from runner.sim.ledger import Fate
from runner.sim.scenario import STANDARD_PREFIX
from worker.protocol import Event

WORK = Workload(40, 400.0, sigma=0.05)


def _conserved(r: Result) -> None:
    assert r.lost == [] and r.double_commits == []
    assert r.committed == r.shards
    assert r.fates[Fate.COMMITTED.value] == r.committed
    assert all(v.gone is not None for v in r.ledger.vms), "a VM outlived the simulation"


def test_spot_refused_for_quota_moves_the_run_to_standard_vms() -> None:
    vm = VmModel(quota_vms=10)  # 10 Spot VMs of the 40 asked for can be had
    without = simulate(Scenario("q", WORK, 40, vm=vm, seed=3))
    with_fb = simulate(Scenario("q", WORK, 40, vm=vm, seed=3, fallback=True, capacity_grace=60))
    _conserved(without)
    _conserved(with_fb)
    assert without.standard_billed == 0 and without.fallback_reason is None
    assert with_fb.fallback_reason is not None and "QUOTA_EXCEEDED" in with_fb.fallback_reason
    assert with_fb.standard_shards >= 20  # most shards ran on standard VMs
    assert with_fb.makespan < 0.6 * without.makespan  # 4 waves on 10 VMs vs about one
    names = [v.name for v in with_fb.ledger.vms if v.name.startswith(STANDARD_PREFIX)]
    assert names and all(not v.preempted for v in with_fb.ledger.vms if v.name in names)


def test_a_shard_preempted_k_times_starts_the_fallback_and_never_before() -> None:
    vm = VmModel(preempt_per_hour=4.0)  # a VM lasts 15 minutes: shards of 400 s get cut often
    work = Workload(80, 400.0, sigma=0.05)  # four waves on 20 VMs: a tail is left to move
    r = simulate(Scenario("p", work, 20, vm=vm, seed=1, fallback=True, fallback_after=3))
    _conserved(r)
    assert r.fallback_reason is not None and "preempted 3 times" in r.fallback_reason
    assert r.fallback_at is not None
    early = [v for v in r.ledger.vms if v.name.startswith(STANDARD_PREFIX)]
    assert early and min(v.created for v in early) >= r.fallback_at
    assert r.standard_shards > 0 and r.standard_billed > 0


def test_no_fallback_when_spot_works() -> None:
    r = simulate(Scenario("ok", WORK, 40, seed=2, fallback=True))
    _conserved(r)
    assert r.fallback_reason is None and r.standard_billed == 0 and r.standard_shards == 0


def test_policy_waits_out_a_short_capacity_error_and_is_sticky() -> None:
    policy = FallbackPolicy(after_preemptions=3, capacity_grace=60)
    refused = [Instance("vm-1", "starting", error="ZONE_RESOURCE_POOL_EXHAUSTED: no capacity")]
    assert not policy.update(0, {}, refused)
    assert not policy.update(30, {}, [])  # it cleared: the grace starts again
    assert not policy.update(40, {}, refused)
    assert not policy.update(90, {}, refused)
    assert policy.update(100, {}, refused) and "ZONE_RESOURCE_POOL_EXHAUSTED" in str(policy.reason)
    assert policy.update(200, {}, [])  # once on, it stays on
    assert is_capacity_error("QUOTA_EXCEEDED: Quota 'PREEMPTIBLE_CPUS' exceeded.")
    assert not is_capacity_error("failed to boot: E: Unable to fetch some archives")


def test_the_tap_counts_preemptions_per_shard() -> None:
    class Bus:
        def __init__(self) -> None:
            self.events: list[Event] = []

        def publish(self, event: Event) -> None:
            self.events.append(event)

        def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
            out, self.events = self.events, []
            return out

        def close(self) -> None:
            pass

    tap = PreemptionTap(Bus())  # type: ignore[abstract]
    for shard in ("a", "b", "a"):
        tap.publish(Event("preempted", "vm", run_id="r", shard_id=shard))
    tap.publish(Event("failed", "vm", run_id="r", shard_id="b"))
    assert len(tap.pull()) == 4
    assert tap.preemptions == {"a": 2, "b": 1}


def test_the_fallback_fleet_routes_growth_and_prices_the_summary() -> None:
    from runner.backends.gcp.shapes.fallback import FallbackFleet
    from runner.engine.fleet import Fleet
    from runner.observe.prices import load_prices
    from runner.sim.clock import SimClock

    class Group(Fleet):
        def __init__(self, prefix: str) -> None:
            self.prefix, self.vms, self.deleted = prefix, {}, []  # type: ignore[var-annotated]

        def instances(self) -> list[Instance]:
            return [Instance(n, s, error=e) for n, (s, e) in sorted(self.vms.items())]

        def grow(self, count: int) -> list[str]:
            names = [f"{self.prefix}-{len(self.vms) + i}" for i in range(count)]
            self.vms.update({n: ("running", None) for n in names})
            return names

        def delete(self, names: object) -> None:
            for n in list(names):  # type: ignore[call-overload]
                self.deleted.append(n)
                self.vms.pop(n, None)

        def wait_empty(self, timeout: float) -> bool:
            return not self.vms

    clock = SimClock(horizon=10_000)
    spot, standard = Group("spot"), Group("std")
    counts: dict[str, int] = {}
    fleet = FallbackFleet(spot=spot, standard=standard, preemptions=counts, clock=clock)
    assert fleet.grow(2) == ["spot-0", "spot-1"]
    spot.vms["spot-1"] = ("starting", None)  # being recreated after a preemption
    fleet.instances()
    counts["s7"] = 3
    clock.sleep(600)
    listed = {i.name for i in fleet.instances()}
    assert fleet.active and "shard s7 was preempted 3 times" in str(fleet.policy.reason)
    assert spot.deleted == ["spot-1"] and "spot-0" in listed  # the working one stays
    assert fleet.grow(1) == ["std-0"]
    clock.sleep(3600)
    fleet.instances()
    fleet.delete(["std-0", "spot-0"])
    assert standard.deleted == ["std-0"] and "spot-0" in spot.deleted
    spot_s, standard_s = fleet.vm_seconds()
    assert (spot_s, standard_s) == (4200.0, 3600.0)
    summary = fleet.summary(
        winners={"s1": "std-0", "s2": "spot-0", "s7": "std-0"},
        spot_seconds=spot_s,
        standard_seconds=standard_s,
        machine_type="e2-standard-2",
    )
    price = load_prices().lookup("e2-standard-2")
    assert price is not None
    assert summary.standard_shards == 2 and summary.standard_vms == 1
    assert summary.standard_cost == price.standard  # one standard VM-hour
    assert "2 shards on 1 standard VMs, 1.00 VM-hours" in summary.line()


def test_once_fallen_back_idle_spot_vms_go_and_queued_shards_move() -> None:
    from runner.backends.gcp.shapes.fallback import FallbackFleet
    from runner.engine.fleet import Fleet
    from runner.sim.clock import SimClock

    class Group(Fleet):
        def __init__(self, names: list[str]) -> None:
            self.vms, self.deleted = list(names), []  # type: ignore[var-annotated]

        def instances(self) -> list[Instance]:
            return [Instance(n, "running") for n in self.vms]

        def grow(self, count: int) -> list[str]:
            return []

        def delete(self, names: object) -> None:
            for n in list(names):  # type: ignore[call-overload]
                self.deleted.append(n)
                self.vms.remove(n)

    class Bus:
        events = [
            Event("idle", "spot-idle"),
            Event("idle", "spot-busy"),
            Event("started", "spot-busy", run_id="r", shard_id="s2"),  # busy again since
        ]

        def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
            out, self.events = self.events, []
            return out

    moves: list[int] = []
    counts: dict[str, int] = {}
    tap = PreemptionTap(Bus(), counts)  # type: ignore[arg-type]
    tap.pull()
    assert tap.idle == {"spot-idle"}
    spot = Group(["spot-busy", "spot-idle"])
    fleet = FallbackFleet(
        spot=spot,
        standard=Group([]),
        preemptions=counts,
        policy=FallbackPolicy(after_preemptions=1),
        clock=SimClock(horizon=100),
        move=lambda: moves.append(1) or 1,
        idle=tap.idle,
    )
    fleet.instances()
    assert spot.deleted == [] and moves == []  # Spot works: nothing moves, nothing goes
    counts["s1"] = 1
    listed = {i.name for i in fleet.instances()}
    assert fleet.active and spot.deleted == ["spot-idle"] and listed == {"spot-busy"}
    assert moves == [1]  # the run's queued shards go to the standard VMs' queue, every poll
    fleet.instances()
    assert moves == [1, 1] and spot.deleted == ["spot-idle"]


def test_a_fallback_is_recorded_once_and_a_resumed_policy_stays_on_it() -> None:
    recorded: list[str] = []
    policy = FallbackPolicy(after_preemptions=1, on_start=recorded.append)
    assert policy.update(0, {"s1": 1}, []) and policy.update(5, {"s1": 1}, [])
    assert recorded == ["shard s1 was preempted 1 times"]  # once, when it started
    # A runner resumed after the fallback: no preemption counted here, the record says it.
    resumed = FallbackPolicy(after_preemptions=1, on_start=recorded.append)
    assert not resumed.update(0, {}, [])
    resumed.resume(1, recorded[0])
    assert resumed.update(2, {}, []) and resumed.reason == recorded[0]
    assert len(recorded) == 1


def test_the_tap_counts_each_preempted_attempt_once_from_events_and_records() -> None:
    class Bus:
        def __init__(self, events: list[Event]) -> None:
            self.events = events

        def publish(self, event: Event) -> None: ...

        def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
            out, self.events = self.events, []
            return out

        def close(self) -> None: ...

    told = Event(kind="preempted", worker="vm-1", run_id="r", shard_id="s1", attempt=1)
    tap = PreemptionTap(Bus([told, told]))  # type: ignore[arg-type]  # one event, told twice
    tap.count("s1", 1)  # and the attempt's record, read by a resumed runner
    tap.count("s1", 2)
    tap.pull()
    assert tap.preemptions == {"s1": 2}
