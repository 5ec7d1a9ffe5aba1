"""--fallback standard in the fleet simulation: the real watch loop and scale policy, a Spot
group and a standard group; every shard still commits exactly once and the fleet ends at zero."""

from __future__ import annotations

from runner.fallback import FallbackPolicy, PreemptionTap, is_capacity_error
from runner.fleet import Instance
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
