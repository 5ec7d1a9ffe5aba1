"""Two runs share one group: a VM still starting that one run's runner asked for is not deleted by
the other's as its spare (while its work lasts, nor at its end), and the asks are kept where
every runner of the deployment reads them: the store."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

from runner.engine import runs
from runner.engine.asks import ASK_STANDS, GROWING_STANDS, Asks, asks_key
from runner.engine.fleet import Fleet, Instance
from runner.engine.policy import decide_scale
from runner.engine.watch import Watcher
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.clock import FakeClock
from worker.protocol import Event, Manifest, RunOptions, Shard


class Group(Fleet):
    """A managed group as the runners see it: a VM it grows is listed starting until it boots
    (``boot``), and every delete is recorded."""

    lists_starting = True

    def __init__(self, *names: str) -> None:
        self.live = {n: Instance(n) for n in names}
        self.made = 0
        self.deleted: list[str] = []

    def instances(self) -> list[Instance]:
        return sorted(self.live.values(), key=lambda i: i.name)

    def grow(self, count: int) -> list[str]:
        names = [f"new{self.made + i}" for i in range(count)]
        self.made += count
        self.live.update((n, Instance(n, "starting")) for n in names)
        return names

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            self.deleted.append(name)
            self.live.pop(name, None)

    def boot(self, name: str) -> None:
        self.live[name] = Instance(name)


def _run(b: Backends, tmp_path: Path, name: str, shards: int) -> Manifest:
    task = tmp_path / f"task-{name}"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    return runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=task,
        shards=[Shard(id=f"{name}{i}", index=i) for i in range(shards)],
        options=RunOptions(),
    )


def _watcher(b: Backends, m: Manifest, group: Group, clock: FakeClock) -> Watcher:
    return Watcher(
        manifest=m,
        store=b.store,
        queue=b.queue,
        events=b.events,
        fleet=group,
        max_workers=4,
        clock=clock,
        reconcile_seconds=1e9,  # the views here are the events'
    )


def _said(
    w: Watcher, kind: str, worker: str, shard: str, clock: FakeClock, run: str | None = None
) -> None:
    """``w`` hears ``worker`` say ``kind`` of ``shard`` of its run (or of ``run``)."""
    event = Event(kind, worker, run or w.run_id, shard, at=clock.time())
    w.view.apply(event, clock.monotonic())


def test_a_vm_another_run_asked_for_is_not_taken_for_spare_while_it_boots(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    group = Group("a0", "b0", "b1")
    run_a = _watcher(b, _run(b, tmp_path, "a", 4), group, clock)
    run_b = _watcher(b, _run(b, tmp_path, "b", 2), group, clock)
    _said(run_a, "started", "a0", "a0", clock)
    _said(run_b, "started", "b0", "b0", clock)
    _said(run_b, "started", "b1", "b1", clock)
    # A has four shards and counts the three VMs as capacity: it asks for one more.
    run_a.scale(run_a.snapshot())
    assert group.made == 1 and group.live["new0"].status == "starting"
    # B has two shards, both running, and four VMs: two too many. a0 said nothing of itself
    # and new0 is A's: neither goes.
    run_b.scale(run_b.snapshot())
    assert group.deleted == []
    # B's shards end: its run is over, and its drain leaves A's VM to A's runner.
    _said(run_b, "succeeded", "b0", "b0", clock)
    _said(run_b, "succeeded", "b1", "b1", clock)
    _said(run_b, "idle", "b0", "", clock)
    _said(run_b, "idle", "b1", "", clock)
    clock.advance(10.0)
    run_b.scale(run_b.snapshot())
    run_b.drain_fleet(wait=False)
    assert sorted(group.deleted) == ["b0", "b1"]
    assert "new0" in group.live
    b.close()


def test_a_vm_another_run_asked_for_is_left_to_it_once_up_and_idle(tmp_path: Path) -> None:
    """A replacement is up before the shard it is for comes back (the frozen VM's lease has
    not lapsed yet): it says it is idle, and the other run's runner, with more VMs than its
    work needs, leaves it be; its drain neither deletes it nor waits for it."""
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    group = Group("a0", "b0", "b1")
    run_a = _watcher(b, _run(b, tmp_path, "a", 4), group, clock)
    run_b = _watcher(b, _run(b, tmp_path, "b", 2), group, clock)
    _said(run_a, "started", "a0", "a0", clock)
    run_a.scale(run_a.snapshot())
    assert group.made == 1  # new0, A's
    group.boot("new0")
    group.boot("b2")  # and a VM left by an earlier run
    for worker, shard in (("b0", "b0"), ("b1", "b1")):
        _said(run_b, "started", worker, shard, clock)
    _said(run_b, "started", "a0", "a0", clock, run=run_a.run_id)
    for worker in ("b2", "new0"):
        _said(run_b, "idle", worker, "", clock)
    clock.advance(10.0)  # their idle words stand
    run_b.scale(run_b.snapshot())
    assert group.deleted == ["b2"]  # B's spare goes; A's is A's
    for worker, shard in (("b0", "b0"), ("b1", "b1")):
        _said(run_b, "succeeded", worker, shard, clock)
        _said(run_b, "idle", worker, "", clock)
    clock.advance(10.0)
    assert run_b.release.drain(group) == ["b0", "b1"]  # deleted, listed till they go
    assert run_b.release.drain(group) == []  # and new0 is not waited for
    assert sorted(group.deleted) == ["b0", "b1", "b2"] and "new0" in group.live
    b.close()


def test_a_run_deletes_the_starting_vms_it_asked_for_and_those_whose_ask_lapsed(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    group = Group("a0")
    run_a = _watcher(b, _run(b, tmp_path, "a", 3), group, clock)
    run_b = _watcher(b, _run(b, tmp_path, "b", 1), group, clock)
    _said(run_a, "started", "a0", "a0", clock)
    run_a.scale(run_a.snapshot())
    assert group.made == 2  # new0 and new1, A's
    # A's first shard ends on a0, which takes the next before the new VMs boot: one of them
    # is one too many, and A deletes it, its own.
    _said(run_a, "succeeded", "a0", "a0", clock)
    _said(run_a, "started", "a0", "a1", clock)
    run_a.scale(run_a.snapshot())
    assert group.deleted == ["new0"]
    # B, over as soon as it began (its shard ran on a0), leaves new1 while A's ask stands and
    # deletes it once the ask has lapsed: a VM starting that long never started.
    _said(run_b, "started", "a0", "b0", clock)
    _said(run_b, "succeeded", "a0", "b0", clock)
    run_b.drain_fleet(wait=False)
    assert group.deleted == ["new0"]
    clock.advance(ASK_STANDS)
    _said(run_b, "heartbeat", "a0", "a1", clock, run=run_a.run_id)  # a0 works on for A
    run_b.drain_fleet(wait=False)
    assert group.deleted == ["new0", "new1"]
    b.close()


def test_the_asks_are_kept_in_the_store_merged_across_runners_and_forgotten(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    first, resumed = Asks(b.store, "r-a", clock), Asks(b.store, "r-a", clock)
    other = Asks(b.store, "r-b", clock)
    first.record(["vm1"])
    clock.advance(ASK_STANDS - 1.0)
    resumed.record(["vm2"])  # a later runner of the same run keeps the earlier ask standing
    assert other.elsewhere({"vm1", "vm2", "vm3"}) == {"vm1", "vm2"}
    assert first.elsewhere({"vm1", "vm2"}) == set()  # its own run's asks are its own
    clock.advance(1.0)
    assert other.elsewhere({"vm1", "vm2"}) == {"vm2"}  # vm1's ask lapsed
    b.store.put(asks_key("r-c"), b"{not json")  # a torn record says nothing
    b.store.put(asks_key("r-d"), b'{"vm3": "yesterday", "vm4": NaN}')
    assert other.elsewhere({"vm2", "vm3", "vm4"}) == {"vm2"}
    resumed.forget()
    assert other.elsewhere({"vm2"}) == set()
    assert not b.store.exists(asks_key("r-a"))
    resumed.forget()  # nothing left to forget: no error
    b.close()


def test_while_another_run_grows_the_group_no_vm_but_this_runs_own_is_deleted(
    tmp_path: Path,
) -> None:
    """The group lists a new VM before the growth's answer names it: meanwhile the runner
    that grows has said so, and the others delete only VMs they asked for themselves."""
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    a, other = Asks(b.store, "r-a", clock), Asks(b.store, "r-b", clock)
    other.record(["mine"])
    a.growing()
    assert other.elsewhere({"new", "mine"}) == {"new"}
    a.record(["new"])  # the growth's answer: from now on only what A named is A's
    assert other.elsewhere({"new", "later"}) == {"new"}
    a.growing()
    clock.advance(GROWING_STANDS)  # a growth that never answered (its runner died) lapses
    assert other.elsewhere({"later"}) == set()
    b.close()


@pytest.mark.parametrize("outstanding", [0, 2])
def test_the_policy_never_names_a_vm_spoken_for(outstanding: int) -> None:
    instances = [Instance("w0"), Instance("w1"), Instance("s0", "starting")]
    kwargs = {
        "outstanding": outstanding,
        "max_workers": 3,
        "slots": 1,
        "instances": instances,
        "idle": {"w1"},
        "busy": {"w0"} if outstanding else set(),
    }
    assert "s0" in decide_scale(**kwargs).delete  # type: ignore[arg-type]
    spared = decide_scale(**kwargs, spoken_for={"s0"})  # type: ignore[arg-type]
    assert "s0" not in spared.delete and spared.add == 0
