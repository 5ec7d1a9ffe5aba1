from __future__ import annotations

from runner.engine.fleet import Instance
from runner.engine.policy import decide_scale


def _fleet(n: int) -> list[Instance]:
    return [Instance(f"w{i}") for i in range(n)]


def test_grows_to_the_work_but_not_past_max_workers() -> None:
    d = decide_scale(outstanding=10, max_workers=4, slots=1, instances=[], idle=set(), busy=set())
    assert d.add == 4 and d.delete == []
    d = decide_scale(
        outstanding=10, max_workers=8, slots=4, instances=_fleet(1), idle=set(), busy=set()
    )
    assert d.add == 2


def test_shrinks_only_idle_instances() -> None:
    d = decide_scale(
        outstanding=1,
        max_workers=4,
        slots=1,
        instances=_fleet(4),
        idle={"w1"},
        busy={"w0", "w2", "w3"},
    )
    assert d.delete == ["w1"]
    d = decide_scale(
        outstanding=1, max_workers=4, slots=1, instances=_fleet(4), idle=set(), busy={"w0"}
    )
    assert d.delete == []  # nobody said it is idle: never kill a possibly busy VM


def test_ends_at_zero_when_nothing_is_outstanding_but_spares_busy() -> None:
    d = decide_scale(
        outstanding=0, max_workers=4, slots=1, instances=_fleet(3), idle=set(), busy={"w2"}
    )
    assert d.delete == ["w0", "w1"]


def test_stopping_instances_are_not_counted() -> None:
    fleet = [Instance("w0", "stopping"), Instance("w1")]
    d = decide_scale(outstanding=2, max_workers=2, slots=1, instances=fleet, idle=set(), busy=set())
    assert d.add == 1


def test_a_stale_worker_is_not_capacity_and_not_deleted_while_work_remains() -> None:
    fleet = _fleet(2)
    d = decide_scale(
        outstanding=2,
        max_workers=2,
        slots=1,
        instances=fleet,
        idle=set(),
        busy={"w1"},
        stale={"w0"},
    )
    assert d.add == 1 and d.delete == []
    d = decide_scale(
        outstanding=1,
        max_workers=2,
        slots=1,
        instances=_fleet(3),
        idle={"w2"},
        busy={"w1"},
        stale={"w0"},
    )
    assert d.delete == ["w2"]  # the idle spare goes; the stale one stays (it may thaw)
    d = decide_scale(
        outstanding=0,
        max_workers=2,
        slots=1,
        instances=fleet,
        idle=set(),
        busy=set(),
        stale={"w0"},
    )
    assert d.delete == ["w0", "w1"]  # at the end every worker goes
