"""The policy changes the fleet simulation argued for: who goes first, and backup attempts."""

from __future__ import annotations

from runner.engine.fleet import Instance
from runner.engine.policy import Stragglers, decide_scale
from worker.protocol import EventKind


def test_surplus_starting_instances_go_before_idle_ready_ones() -> None:
    fleet = [Instance("a"), Instance("b"), Instance("c", "starting"), Instance("d")]
    d = decide_scale(
        outstanding=2, max_workers=4, slots=1, instances=fleet, idle={"a", "b"}, busy={"d"}
    )
    # Target 2, so two go: "c" first (still being created), then one of the idle ready ones;
    # the other stays for the one queued shard (2 outstanding, 1 running).
    assert d.delete == ["c", "a"]


def test_idle_ready_workers_stay_for_queued_shards() -> None:
    fleet = [Instance(n) for n in "abcde"]
    d = decide_scale(
        outstanding=3, max_workers=5, slots=1, instances=fleet, idle={"a", "b", "c"}, busy={"d"}
    )
    # 3 outstanding, 1 running: the 2 queued shards keep 2 idle workers, so of the surplus
    # of 2 only one goes.
    assert d.delete == ["a"]
    d = decide_scale(
        outstanding=0, max_workers=5, slots=1, instances=fleet, idle={"a", "b", "c"}, busy={"d"}
    )
    # Nothing outstanding: every worker known free goes; "e" never said it is free (it may
    # have just started another run's shard) and stays for its runner or its idle timeout.
    assert d.delete == ["a", "b", "c"]


def _seen(s: Stragglers, shards: int, seconds: float) -> None:
    for i in range(shards):
        s.saw(EventKind.STARTED, f"f{i}", "w", 0.0)
        s.saw(EventKind.SUCCEEDED, f"f{i}", "w", seconds)


def test_stragglers_are_backed_up_once_and_the_losers_are_named() -> None:
    s = Stragglers()
    _seen(s, 30, 10.0)
    s.saw(EventKind.STARTED, "slow", "w1", 100.0)
    s.saw(EventKind.STARTED, "ok", "w2", 125.0)
    assert s.pick(120.0, {"slow": "w1", "ok": "w2"}) == []  # 20 s is not 3 x 10 s yet
    assert s.pick(131.0, {"slow": "w1", "ok": "w2"}) == ["slow"]
    assert s.pick(140.0, {"slow": "w1", "ok": "w2"}) == []  # waiting for its backup to start
    s.saw(EventKind.STARTED, "slow", "w3", 141.0)
    s.saw(EventKind.SUCCEEDED, "slow", "w3", 152.0)
    assert s.take_losers() == {"w1"} and s.take_losers() == set()
    assert s.wins == 1 and s.losses == 0


def test_a_natural_heavy_tail_is_not_taken_for_stragglers() -> None:
    s = Stragglers()
    for i in range(100):  # median 10 s, but one in ten takes 100 s
        s.saw(EventKind.STARTED, f"f{i}", "w", 0.0)
        s.saw(EventKind.SUCCEEDED, f"f{i}", "w", 100.0 if i % 10 == 0 else 10.0)
    threshold = s.threshold()
    assert threshold is not None and threshold >= 100.0


def test_instances_the_group_cannot_create_are_no_capacity_and_ask_for_no_more() -> None:
    quota = "QUOTA_EXCEEDED: Quota 'CPUS' exceeded."
    fleet = [
        Instance("a"),
        Instance("b", "starting", error=quota),
        Instance("c", "starting", error=quota),
    ]
    # 10 outstanding, 3 allowed: one works, two cannot start. Adding would only queue more VMs
    # the project cannot give.
    d = decide_scale(
        outstanding=10, max_workers=3, slots=1, instances=fleet, idle=set(), busy={"a"}
    )
    assert (d.add, d.delete) == (0, [])
    # More allowed than exist: grow past them (quota may be there in another zone, or free up).
    d = decide_scale(
        outstanding=10, max_workers=5, slots=1, instances=fleet, idle=set(), busy={"a"}
    )
    assert (d.add, d.delete) == (2, [])
    # Work down to what runs: those that cannot start go first.
    d = decide_scale(outstanding=1, max_workers=3, slots=1, instances=fleet, idle=set(), busy={"a"})
    assert d.delete == ["b", "c"]


def test_a_vm_that_failed_to_boot_is_deleted_and_replaced() -> None:
    fleet = [Instance("a"), Instance("b", error="failed to boot: E: apt", removable=True)]
    d = decide_scale(outstanding=5, max_workers=2, slots=1, instances=fleet, idle=set(), busy={"a"})
    assert d.delete == ["b"] and d.add == 1
    d = decide_scale(outstanding=0, max_workers=2, slots=1, instances=fleet, idle={"a"}, busy=set())
    assert sorted(d.delete) == ["a", "b"]
    d = decide_scale(outstanding=0, max_workers=2, slots=1, instances=fleet, idle=set(), busy=set())
    assert d.delete == ["b"]  # the broken one goes whatever is known of the others
