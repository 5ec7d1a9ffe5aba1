"""Small simulated runs: every shard ends committed (once) or failed, and the fleet ends at zero.

Each run drives the real runner watch loop and scale policy and the real agent's claim, commit,
retry and preemption code on virtual time, so these are fast (well under a second each).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from runner.sim import Result, Scenario, VmModel, Workload, simulate
from runner.sim.clock import SimClock
from runner.sim.ledger import Fate
from runner.sim.pubsub import SimPubSub
from worker.backends.local.queue import LocalQueue
from worker.queue import WorkQueue


def _assert_conserved(r: Result, *, failed: int = 0) -> None:
    assert r.lost == [], f"shards neither committed nor failed: {r.lost[:5]}"
    assert r.double_commits == []
    assert r.committed + r.failed == r.shards
    assert r.failed == failed
    assert r.fates[Fate.COMMITTED.value] == r.committed  # each committed shard won exactly once
    assert all(v.gone is not None for v in r.ledger.vms), "a VM outlived the simulation"
    assert r.zero_at >= r.makespan


def test_founding_case_in_miniature_is_near_the_lower_bound_and_ends_at_zero() -> None:
    r = simulate(Scenario("mini", Workload(20, 400.0, sigma=0.05), max_workers=20))
    _assert_conserved(r)
    assert r.ratio < 1.2
    assert r.fleet["created"] == 20 and r.fleet["self_deleted"] == 0  # the runner removed them
    assert r.zero_at - r.makespan < 30  # scale-down: no VM lingers after the run


def test_preemption_lost_nacks_and_duplicate_deliveries_lose_no_shard() -> None:
    vm = VmModel(preempt_per_hour=4.0, lost_stop_rate=0.5)
    totals: Counter[str] = Counter()
    for seed in range(4):
        r = simulate(
            Scenario(
                "rough",
                Workload(60, 120.0, sigma=0.3),
                max_workers=20,
                vm=vm,
                duplicate_rate=0.05,
                seed=seed,
            )
        )
        _assert_conserved(r)
        totals.update(r.fleet)
        totals.update(r.queue)
        totals.update(r.fates)
    assert totals["preempted"] > 0 and totals["recreated"] > 0 and totals["lost"] > 0
    assert totals["lapsed"] > 0 and totals["nacked"] > 0 and totals["lost_acks"] > 0


def test_flaky_tasks_retry_and_poison_shards_fail_after_max_attempts() -> None:
    work = Workload(50, 30.0, failure_rate=0.2, poison_fraction=0.1)
    r = simulate(Scenario("flaky", work, max_workers=10, max_attempts=3))
    _assert_conserved(r, failed=5)
    assert r.fates[Fate.FAILED.value] >= 5 * 3


def test_a_shard_that_kills_its_worker_is_dead_lettered_and_reported_failed() -> None:
    def queue(clock: SimClock) -> WorkQueue:
        return SimPubSub(clock, max_deliveries=3, min_backoff=1.0, max_backoff=5.0)

    work = Workload(20, 20.0, crash_fraction=0.05)
    r = simulate(Scenario("crash", work, max_workers=5), queue_factory=queue)
    _assert_conserved(r, failed=1)
    assert r.fates[Fate.CRASHED.value] == 3 and r.queue["dead_lettered"] == 1
    assert r.fleet["crashed"] == 3


def test_the_local_sqlite_queue_gives_the_same_guarantees(tmp_path: Path) -> None:
    def queue(clock: SimClock) -> WorkQueue:
        return LocalQueue(tmp_path / "queue.db", clock=clock, lease_seconds=60.0)

    vm = VmModel(preempt_per_hour=3.0, lost_stop_rate=0.3)
    r = simulate(
        Scenario("local", Workload(30, 90.0, sigma=0.3), max_workers=10, vm=vm, seed=1),
        queue_factory=queue,
    )
    _assert_conserved(r)
    assert r.fleet["preempted"] > 0


def test_speculation_cuts_a_straggler_tail_without_losing_or_double_committing() -> None:
    work = Workload(
        300, 60.0, sigma=0.2, tail_fraction=0.02, tail_factor=20.0, tail_per_attempt=True
    )
    plain = simulate(Scenario("tail", work, max_workers=30, seed=2))
    spec = simulate(Scenario("tail", work, max_workers=30, seed=2, speculate=True))
    _assert_conserved(plain)
    _assert_conserved(spec)
    assert spec.makespan < 0.8 * plain.makespan
    assert spec.fates[Fate.PREEMPTED.value] > 0  # losing attempts were released


def test_failed_boots_and_a_quota_limited_group_finish_slower_losing_nothing() -> None:
    work = Workload(60, 120.0, sigma=0.2)
    base = simulate(Scenario("clean", work, max_workers=20))
    _assert_conserved(base)
    rough = VmModel(boot_fail_rate=0.3, quota_vms=8)
    r = simulate(Scenario("boot+quota", work, max_workers=20, vm=rough, seed=1))
    _assert_conserved(r)
    assert r.fleet["boot_failed"] > 0 and r.fleet["quota_blocked"] > 0
    assert r.makespan > base.makespan  # slower: at most 8 VMs, some of them never working
    assert max(s.vms for s in r.ledger.samples) <= 8  # VMs past the quota were never billed
    assert r.zero_at - r.makespan < 120  # and none is left behind
