"""The scale policy, and which workers a run's runner may delete: never one busy with another
run of the deployment (known by the workers' own words, or locally by the queue's lease records).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.backends.local.fleet import LocalFleet
from runner.engine import runs
from runner.engine.fleet import Instance
from runner.engine.policy import decide_scale
from runner.engine.release import LeaseRecords, Release
from runner.engine.reports import shard_reports
from runner.engine.run_view import RunView
from runner.engine.watch import Watcher
from tests.e2e.conftest import make_task, wait_for
from worker.backends.local.backend import open_local
from worker.clock import FakeClock
from worker.protocol import Event, RunOptions, Shard


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


def test_while_a_stream_is_still_published_no_idle_or_starting_worker_is_surplus() -> None:
    """A stream's queue running dry between two batches is no end of its work: its idle and
    starting workers stay (the next batch needs them); a broken instance still goes."""
    fleet = [*_fleet(3), Instance("w3", "starting"), Instance("gone", removable=True)]

    def decide(publishing: bool) -> list[str]:
        d = decide_scale(
            outstanding=1,
            max_workers=4,
            slots=1,
            instances=fleet,
            idle={"w1", "w2"},
            busy={"w0"},
            publishing=publishing,
        )
        assert d.add == 0
        return sorted(d.delete)

    assert decide(publishing=False) == ["gone", "w1", "w2", "w3"]
    assert decide(publishing=True) == ["gone"]


def test_ends_at_zero_when_nothing_is_outstanding_but_spares_busy() -> None:
    d = decide_scale(
        outstanding=0,
        max_workers=4,
        slots=1,
        instances=_fleet(3),
        idle={"w0", "w1", "w2"},
        busy={"w2"},
    )
    assert d.delete == ["w0", "w1"]


def test_at_the_end_only_workers_known_free_go() -> None:
    fleet = [*_fleet(3), Instance("w3", "starting"), Instance("w4", "stopping")]
    d = decide_scale(
        outstanding=0, max_workers=4, slots=1, instances=fleet, idle={"w0"}, busy={"w1"}
    )
    # w2 said nothing: it may have just started another run's shard, so it is left to that
    # run's runner or to its own idle timeout. A starting VM cannot be busy yet.
    assert d.delete == ["w0", "w3"]


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
    assert d.delete == ["w0"]  # at the end the stale one goes; w1 said nothing of itself
    d = decide_scale(
        outstanding=0,
        max_workers=2,
        slots=1,
        instances=fleet,
        idle={"w1"},
        busy=set(),
        stale={"w0"},
    )
    assert d.delete == ["w0", "w1"]  # every worker known free goes


def test_a_worker_busy_with_another_run_is_no_capacity_of_this_one_and_never_deleted() -> None:
    # Run A has four shards, one running on w0; w1 and w2 are busy with run B's long shards.
    kwargs = {"max_workers": 4, "slots": 1, "instances": _fleet(3), "idle": set()}
    d = decide_scale(outstanding=4, busy={"w0", "w1", "w2"}, elsewhere={"w1", "w2"}, **kwargs)
    assert d.add == 3 and d.delete == []  # three more of its own, up to its four
    assert decide_scale(outstanding=4, busy={"w0", "w1", "w2"}, **kwargs).add == 1  # unknown
    # A's work is down to its one running shard: nothing of B's is its surplus.
    d = decide_scale(outstanding=1, busy={"w0", "w1", "w2"}, elsewhere={"w1", "w2"}, **kwargs)
    assert d.add == 0 and d.delete == []


def test_an_idle_word_stands_only_once_settled_and_never_behind_a_later_start() -> None:
    view = RunView("r-a")
    view.apply(Event(kind="idle", worker="w1", at=10.0), now=100.0)
    assert view.idle_for(101.0, settle=3) == set()  # a start may be right behind it
    assert view.settles_in(101.0, settle=3) == 2.0
    assert view.idle_for(103.0, settle=3) == {"w1"}
    assert view.free(101.0, limit=70, settle=3) == {"w1"}  # no other run: taken at its word
    # Events come out of order: a start the worker sent after its idle word wins.
    view.apply(Event(kind="started", worker="w2", run_id="r-b", shard_id="s", at=21.0), 104.0)
    view.apply(Event(kind="idle", worker="w2", at=20.0), now=104.0)
    assert view.idle_for(110.0, settle=3) == {"w1"} and view.busy_elsewhere() == {"w2"}
    view.apply(Event(kind="idle", worker="w3", at=30.0), now=110.0)
    assert view.free(111.0, limit=70, settle=3) == {"w1"}  # another run is around: it waits
    assert view.free(113.0, limit=70, settle=3) == {"w1", "w3"}


def test_retries_are_counted_from_attempt_numbers_lost_attempts_too_in_any_order() -> None:
    """Only a "retrying" event counted: a shard whose worker was killed ran again unsaid
    (``0 retried``), and a backup's loser let go counted as a preemption."""
    view = RunView("r-a")

    def saw(kind: str, shard: str, attempt: int) -> None:
        event = Event(kind=kind, worker="w", run_id="r-a", shard_id=shard, attempt=attempt)
        view.apply(event, now=1.0)

    saw("started", "lost", 1)
    saw("started", "lost", 2)  # its first attempt died with its worker: nothing said
    saw("started", "failing", 1)
    saw("started", "failing", 3)  # its second's start heard after its third's
    saw("retrying", "failing", 1)
    saw("started", "failing", 2)
    saw("started", "preempted", 1)
    saw("started", "preempted", 2)
    saw("preempted", "preempted", 1)
    saw("started", "straggler", 1)
    saw("started", "straggler", 2)
    view.backups += 1  # that one was a backup (runner.engine.speculation)
    saw("started", "retried round", 4)  # `runner retry`: its round starts at attempt 4
    assert (view.restarts, view.preempted, view.retried) == (5, 1, 3)


def test_once_a_run_is_over_only_workers_known_to_work_for_no_other_run_are_free() -> None:
    view = RunView("r-a")
    view.listed([Instance(n) for n in ("idle", "mine", "theirs", "new", "quiet")], now=0.0)
    view.apply(Event(kind="idle", worker="idle"), now=1.0)
    view.apply(Event(kind="started", worker="mine", run_id="r-a", shard_id="s1"), now=1.0)
    view.apply(Event(kind="started", worker="theirs", run_id="r-b", shard_id="s2"), now=1.0)
    view.apply(Event(kind="heartbeat", worker="theirs", run_id="r-b", shard_id="s2"), now=69.0)
    view.apply(Event(kind="heartbeat", worker="mine", run_id="r-a", shard_id="s1"), now=69.0)
    view.listed([Instance(n) for n in ("idle", "mine", "theirs", "new", "quiet")], now=50.0)
    view.listed([Instance(n) for n in ("idle", "mine", "theirs", "new", "quiet", "newer")], 60.0)
    # "mine" runs this (cancelled) run's shard: it may have stopped it and taken another run's
    # by now; "quiet" was never heard from in 75 s, more than a lease and a heartbeat, and the
    # run's records name it holding an attempt of the run; "new", as silent, is named by none
    # (it may work for a run whose events came late); "newer" is listed since 60 s and may
    # just have taken work.
    free = view.free(now=75.0, limit=70.0, settle=3.0, holders={"quiet", "newer"})
    assert free == {"idle", "quiet"}
    assert view.free(now=75.0, limit=70.0, settle=3.0) == {"idle"}
    assert view.free(now=75.0, limit=80.0, settle=3.0, holders={"quiet"}) == {"idle"}


@pytest.mark.parametrize("then", ["started", "idle"])
def test_a_worker_last_heard_on_the_cancelled_run_is_waited_for_not_deleted(then: str) -> None:
    """Cancelled, A's runner drains while A's worker has already stopped A's shard and taken
    one of run B, its words of both still on their way: deleting it would kill B's attempt."""
    clock = FakeClock()
    view = RunView("r-a")
    view.apply(Event(kind="started", worker="w1", run_id="r-a", shard_id="s1"), clock.monotonic())
    group = _Group(["w1"], by_itself=True)
    release = Release(view, "r-a", clock, silence=70.0)
    clock.advance(2.0)
    assert release.drain(group.fleet) == ["w1"]  # waited for: it has not said what it does now
    assert group.live["w1"].status == "running"
    # Its words arrive: the cancelled attempt ended, then either B's shard or nothing to do.
    view.apply(
        Event(kind="failed", worker="w1", run_id="r-a", shard_id="s1", detail="run cancelled"),
        clock.monotonic(),
    )
    if then == "started":
        view.apply(
            Event(kind="started", worker="w1", run_id="r-b", shard_id="s7"), clock.monotonic()
        )
        assert release.drain(group.fleet) == []  # busy with B: left alone, not waited for
        assert group.live["w1"].status == "running"
    else:
        view.apply(Event(kind="idle", worker="w1"), clock.monotonic())
        assert release.drain(group.fleet) == ["w1"]  # free now: deleted
        assert group.live["w1"].status == "stopping"


def test_local_lease_records_tell_which_runs_each_worker_works_for(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    mine, theirs = (
        runs.create_run(
            store=b.store,
            queue=b.queue,
            task_dir=make_task(tmp_path / run, "def run(shard):\n    pass\n"),
            shards=(Shard(id=f"s{i}", index=i) for i in range(2)),
            options=RunOptions(),
        )
        for run in ("a", "b")
    )
    expected: dict[str, set[str]] = {}
    for worker in ("w1", "w3", "w2", "w3"):  # the queue hands out the oldest message first
        (d,) = b.queue.receive(1, 0, worker=worker)
        expected.setdefault(worker, set()).add(d.message.run_id)
    assert expected == {
        "w1": {mine.run_id},
        "w3": {mine.run_id, theirs.run_id},
        "w2": {theirs.run_id},
    }
    fleet = LocalFleet(tmp_path / "store")
    try:
        assert isinstance(fleet, LeaseRecords)
        held = fleet.lease_runs()
        assert held == expected
        release = Release(RunView(mine.run_id), mine.run_id, FakeClock(), silence=70.0)
        names = [Instance(n) for n in ("w0", "w1", "w2", "w3")]
        assert release.free(names, held) == {"w0", "w1"}  # holding nothing, or only this run's
        assert release.elsewhere(held) == {"w2", "w3"}
    finally:
        fleet.close()


HOLD = """
import os, time
from pathlib import Path

def run(shard):
    marks = Path(os.environ["MARK_DIR"])
    (marks / f"{RUN}.{shard.index}.{shard.attempt}").touch()
    while not (marks / "go").exists():  # until the test lets it go (or its run is cancelled)
        time.sleep(0.05)
"""


def test_a_cancelled_runs_runner_stops_only_its_own_local_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARK_DIR", str(marks))
    root = tmp_path / "store"
    b = open_local(root)
    made = []
    for run in ("a", "b"):
        task = make_task(tmp_path / run, HOLD.replace("RUN", repr(run)))
        made.append(
            runs.create_run(
                store=b.store,
                queue=b.queue,
                task_dir=task,
                shards=(Shard(id=f"s{i}", index=i) for i in range(2)),
                options=RunOptions(),
            )
        )
    a, other = made
    fleet = LocalFleet(root, idle_timeout=60)
    watcher = Watcher(manifest=a, store=b.store, queue=b.queue, events=b.events, fleet=fleet)
    try:
        fleet.grow(4)  # the oldest messages first: two workers take A's shards, two take B's
        wait_for(lambda: len(list(marks.iterdir())) == 4, 60, "every shard running")
        busy_b = set((b.queue.leases(other.run_id) or {}).values())
        assert len(busy_b) == 2 and not busy_b & set((b.queue.leases(a.run_id) or {}).values())
        runs.cancel(b.store, b.queue, a.run_id)
        assert watcher.drain_fleet(timeout=30)  # A's two workers go; B's two are left be
        assert {i.name for i in fleet.instances()} == busy_b
        (marks / "go").touch()
        wait_for(lambda: runs.committed(b.store, other.run_id) == {"s0", "s1"}, 30, "B's commits")
        states = [s.state for r in shard_reports(b.store, other.run_id) for s in r.attempts]
        assert states == ["succeeded", "succeeded"]  # B lost no attempt to A's cancel
    finally:
        fleet.delete(i.name for i in fleet.instances())
        fleet.wait_empty(30)
        fleet.close()


def test_an_idle_word_said_again_does_not_start_the_settle_over() -> None:
    view = RunView("r-a")
    view.apply(Event(kind="started", worker="w9", run_id="r-b", shard_id="s", at=1.0), 1.0)
    view.apply(Event(kind="idle", worker="w1", at=10.0), now=100.0)
    view.apply(Event(kind="idle", worker="w1", at=12.0), now=102.0)  # said again (a heartbeat)
    assert view.idle_for(103.0, settle=3) == {"w1"}  # settled 3 s after its first idle word
    view.apply(Event(kind="started", worker="w1", run_id="r-b", shard_id="t", at=14.0), 104.0)
    view.apply(Event(kind="idle", worker="w1", at=15.0), now=105.0)  # worked since: anew
    assert view.idle_for(107.0, settle=3) == set()
    assert view.idle_for(108.0, settle=3) == {"w1"}


class _Group:
    """A group whose deleted instances are listed stopping until they go (``gone``)."""

    def __init__(self, names: list[str], *, by_itself: bool) -> None:
        from runner.engine.fleet import Fleet

        self.live = {n: Instance(n) for n in names}
        self.fleet = type(
            "G",
            (Fleet,),
            {
                "deletes_by_itself": by_itself,
                "instances": lambda _: list(self.live.values()),
                "grow": lambda _, count: [],
                "delete": lambda _, names: self.live.update(
                    (n, Instance(n, status="stopping")) for n in names
                ),
            },
        )()


@pytest.mark.parametrize("by_itself", [True, False])
def test_the_drain_after_a_run_waits_for_a_deleted_vm_only_where_it_would_not_go_by_itself(
    by_itself: bool,
) -> None:
    clock = FakeClock()
    view = RunView("r1")
    view.apply(Event(kind="idle", worker="w1"), now=clock.monotonic())
    group = _Group(["w1"], by_itself=by_itself)
    release = Release(view, "r1", clock, silence=70.0)
    assert release.drain(group.fleet) == ["w1"]  # as listed before the delete
    assert group.live["w1"].status == "stopping"  # deleted: the idle worker was free
    # Listed stopping since: a managed group's VM stops whatever its guest does, nothing more
    # to wait for; a local worker process is waited for until it has exited.
    assert release.drain(group.fleet) == ([] if by_itself else ["w1"])
