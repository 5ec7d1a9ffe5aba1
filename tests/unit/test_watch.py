"""The watcher's view of a run: events, reconciliation and dead letters, on the local backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.engine import listing, runs
from runner.engine.fleet import Instance
from runner.engine.lost import PUBSUB_MAX_BACKOFF
from runner.engine.policy import decide_scale
from runner.engine.watch import Watcher
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.backends.local.queue import LocalQueue
from worker.clock import FakeClock
from worker.errors import BackendError
from worker.protocol import (
    Event,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    ShardResult,
    WorkMessage,
)
from worker.queue import QueueStats, WorkQueue


def _task(tmp_path: Path) -> Path:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    return task


def test_dead_letters_of_every_run_are_recorded(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store", max_deliveries=1)
    shards = [Shard(id="s0", index=0)]
    run_a = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=_task(tmp_path),
        shards=iter(shards),
        options=RunOptions(),
    )
    run_b = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=tmp_path / "task",
        shards=iter(shards),
        options=RunOptions(),
    )
    for d in b.queue.receive(10, 0):
        if d.message.run_id == run_b.run_id:
            b.queue.nack(d)  # its worker died: the next delivery is past the limit
        else:
            b.queue.ack(d)
    assert b.queue.receive(10, 0) == []
    Watcher(manifest=run_a, store=b.store, queue=b.queue, events=b.events).reconcile()
    assert runs.failed(b.store, run_b.run_id) == {"s0"}  # recorded though A's watcher took it


def test_workers_busy_with_another_run_are_busy() -> None:
    from worker.protocol import Manifest

    manifest = Manifest(run_id="r-a", bundle="x", entry="python", shard_count=1)
    w = Watcher(manifest=manifest, store=None, queue=None, events=None)  # type: ignore[arg-type]
    w._apply(Event(kind="started", worker="w1", run_id="r-b", shard_id="s"))
    w._apply(Event(kind="started", worker="w2", run_id="r-a", shard_id="s"))
    assert w.view.busy_workers() == {"w1", "w2"}
    w._apply(Event(kind="succeeded", worker="w1", run_id="r-b", shard_id="s"))
    assert w.view.busy_workers() == {"w2"}


class _BrokenQueue:
    """Publishes the first batch, then fails, as a lost connection would."""

    def __init__(self, inner: WorkQueue):
        self.inner = inner
        self.calls = 0

    def publish(self, messages: list[WorkMessage], *, delay: float = 0.0) -> int:
        self.calls += 1
        if self.calls > 1:
            raise ConnectionError("connection reset")
        return self.inner.publish(messages)

    def purge(self, run_id: str) -> int:
        return self.inner.purge(run_id)


def test_a_failed_publish_leaves_a_run_that_watch_finishes_publishing(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    queue = _BrokenQueue(b.queue)
    shards = (Shard(id=f"s{i}", index=i) for i in range(2500))  # three publish batches
    created: list[str] = []
    with pytest.raises(BackendError, match=r"stopped after 1000 of 2500 shards.*runner watch"):
        runs.create_run(
            store=b.store,
            queue=queue,  # type: ignore[arg-type]
            task_dir=_task(tmp_path),
            shards=shards,
            options=RunOptions(),
            on_created=lambda m: created.append(m.run_id),
        )
    (manifest,) = listing.list_runs(b.store)
    assert created == [manifest.run_id]  # the id was known before publishing started
    assert manifest.state == RunState.ACTIVE.value and manifest.published == 1000
    assert listing.shown_state(manifest, manifest.created_at + 1).startswith("publishing (1000")
    assert "interrupted" in listing.shown_state(manifest, manifest.created_at + 3600)
    done = runs.publish_rest(b.store, b.queue, manifest)
    assert done.published == 2500 and not done.publishing
    assert b.queue.stats(manifest.run_id).queued == 2500  # each shard exactly once
    assert listing.shown_state(done, done.created_at + 3600) == "active"


def _run(b: Backends, tmp_path: Path, n: int) -> Manifest:
    return runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=_task(tmp_path),
        shards=(Shard(id=f"s{i:03d}", index=i) for i in range(n)),
        options=RunOptions(),
    )


def _commit(b: Backends, run_id: str, shard_id: str) -> None:
    result = ShardResult(
        run_id=run_id,
        shard_id=shard_id,
        attempt=1,
        worker="w",
        started_at=0.0,
        finished_at=1.0,
    )
    assert b.store.create(Layout.result(run_id, shard_id), result.to_json())


def test_reconcile_pages_through_markers_and_confirms_the_end_in_full(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 35)
    for i in range(35):
        _commit(b, m.run_id, f"s{i:03d}")
    w = Watcher(manifest=m, store=b.store, queue=b.queue, events=b.events, page=10)
    w.reconcile()  # the first is a full pass: a re-attached watch is right from its first frame
    assert len(w.view.succeeded) == 35
    w.view.succeeded.clear()  # as if every event had been lost
    for expected in (10, 20, 30, 35, 35):
        w.reconcile()
        assert len(w.view.succeeded) == expected  # one bounded page each, wrapping around
    w.view.succeeded.clear()
    w.reconcile(full=True)
    assert len(w.view.succeeded) == 35


def test_a_shard_missing_from_the_queue_is_requeued_once(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 3)
    w = Watcher(manifest=m, store=b.store, queue=b.queue, events=b.events)
    deliveries = b.queue.receive(3, 0, worker="w1")
    for d in deliveries:
        if d.message.shard_id == "s000":
            _commit(b, m.run_id, "s000")
            b.queue.ack(d)
        elif d.message.shard_id == "s001":
            b.queue.ack(d)  # its message is gone, nothing committed: lost
    w.reconcile()
    assert w.lost.requeued == 0  # missing once may be a passing state
    w.reconcile()
    assert w.lost.requeued == 1
    assert b.queue.pending(m.run_id) == {"s001", "s002"}
    w.reconcile()
    assert w.lost.requeued == 1  # it has a message now


def test_a_worker_whose_lease_lapsed_is_neither_busy_nor_capacity(tmp_path: Path) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock, lease_seconds=3)
    m = _run(b, tmp_path, 1)
    w = Watcher(manifest=m, store=b.store, queue=b.queue, events=b.events, clock=clock)
    b.queue.receive(1, 0, worker="w1")
    w._apply(Event(kind="started", worker="w1", run_id=m.run_id, shard_id="s000"))
    w.reconcile()
    assert w.view.running == {"s000": "w1"} and w.view.busy_workers() == {"w1"}
    clock.advance(5)  # w1 froze: no heartbeat extended the lease
    w.reconcile()
    assert w.view.running == {} and w.view.stale == {"w1"} and w.view.busy_workers() == set()
    snap = w.snapshot([Instance("w1")])
    assert snap.queued == 1
    d = decide_scale(
        outstanding=1,
        max_workers=1,
        slots=1,
        instances=[Instance("w1")],
        idle=set(),
        busy=w.view.busy_workers(),
        stale=w.view.stale,
    )
    assert d.add == 1 and d.delete == []  # a worker for the shard; the frozen one is left be
    w._apply(Event(kind="heartbeat", worker="w1", run_id=m.run_id, shard_id="s000"))
    assert w.view.stale == set()  # it thawed


def test_without_lease_records_a_silent_attempt_lapses_after_the_lease(tmp_path: Path) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    m = _run(b, tmp_path, 2)
    w = Watcher(
        manifest=m, store=b.store, queue=b.queue, events=b.events, clock=clock, lease_seconds=60
    )
    w._apply(Event(kind="started", worker="w1", run_id=m.run_id, shard_id="s000"))
    w._apply(Event(kind="heartbeat", worker="w2", run_id=m.run_id, shard_id="s001"))
    for _ in range(8):
        clock.advance(10)
        w._apply(Event(kind="heartbeat", worker="w2", run_id=m.run_id, shard_id="s001"))
        w._lapse(clock.monotonic())
    assert w.view.running == {"s001": "w2"}  # w1 went silent for 80 s > lease + heartbeat
    assert w.view.stale == {"w1"}


def test_broken_manifest_is_named(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 1)
    path = tmp_path / "store" / Layout.manifest(m.run_id)
    path.write_bytes(path.read_bytes()[:20])  # truncated
    with pytest.raises(BackendError, match=r"run\.json is broken \(not JSON"):
        runs.load_manifest(b.store, m.run_id)
    found = listing.scan_runs(b.store)
    assert found.manifests == [] and list(found.broken) == [str(path)]


def test_a_reattached_watch_shows_the_true_running_count_from_its_first_frame(
    tmp_path: Path,
) -> None:
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 5)
    b.queue.receive(1, 0, worker="w1")
    b.queue.receive(1, 0, worker="w2")
    _commit(b, m.run_id, "s004")
    w = Watcher(manifest=m, store=b.store, queue=b.queue, events=b.events)  # no events seen
    first = w.poll()
    assert (first.running, first.succeeded, first.queued) == (2, 1, 2)
    assert w.view.busy_workers() == {"w1", "w2"}


class _PubSubLike(LocalQueue):
    """The local queue, answering like Pub/Sub: no lease records, no message list, no counts."""

    def leases(self, run_id: str) -> dict[str, str] | None:
        return None

    def pending(self, run_id: str) -> set[str] | None:
        return None

    def stats(self, run_id: str | None = None) -> QueueStats:
        return QueueStats(queued=None, leased=None, dead=None)


def test_without_a_message_list_shards_are_lost_only_after_a_long_idle_quiet(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    queue = _PubSubLike(tmp_path / "store" / "queue.db", clock=clock)
    m = _run(b, tmp_path, 2)
    for d in queue.receive(2, 0):
        queue.ack(d)  # both messages lost; nothing committed
    w = Watcher(
        manifest=m, store=b.store, queue=queue, events=b.events, clock=clock, lease_seconds=60
    )
    w.reconcile()
    w._apply(Event(kind="idle", worker="w1"))
    quiet = 60 + w.heartbeat_seconds + PUBSUB_MAX_BACKOFF
    for _ in range(int(quiet // 5)):
        clock.advance(5)
        w.reconcile()
    assert w.lost.requeued == 0  # workers idle for less than lease + the longest backoff
    clock.advance(10)
    w.reconcile()
    assert w.lost.requeued == 2
    assert {d.message.shard_id for d in queue.receive(10, 0)} == {"s000", "s001"}


def test_a_quiet_watch_slows_down_and_is_quick_again_when_a_worker_speaks(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 2)
    naps: list[float] = []

    def said(kind: str, shard: str) -> None:
        if kind == "succeeded":
            _commit(b, m.run_id, shard)
        b.events.publish(Event(kind=kind, worker="w", run_id=m.run_id, shard_id=shard))

    class Recording(FakeClock):
        def sleep(self, seconds: float) -> None:
            naps.append(round(seconds, 4))
            if len(naps) == 8:  # a worker starts a shard
                said("started", "s000")
            if len(naps) == 12:  # and finishes it, and starts the last one: nothing queued
                said("succeeded", "s000")
                said("started", "s001")
            if len(naps) == 16:  # which is the run's end
                said("succeeded", "s001")
            super().sleep(seconds)

    w = Watcher(
        manifest=m,
        store=b.store,
        queue=b.queue,
        events=b.events,
        clock=Recording(),
        quiet_poll_seconds=0.25,
    )
    assert w.watch(poll_seconds=0.02).finished
    assert naps[:8] == [0.03, 0.045, 0.0675, 0.1013, 0.1519, 0.2278, 0.25, 0.25]
    assert naps[8] == 0.02  # heard from: the quick pace again
    assert naps[9:12] == [0.03, 0.045, 0.0675]
    # Every shard left is running: each commit may be the last, looked for four times as often.
    assert naps[12:16] == [0.005, 0.0075, 0.0112, 0.0169]
    assert len(naps) == 16


def test_a_disk_that_stays_full_stops_the_watch_with_one_line(tmp_path: Path) -> None:
    from runner.backends.local.fleet import LocalFleet
    from worker.errors import DiskFull

    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 1)
    clock = FakeClock()
    full = {"now": False}

    class Fleet(LocalFleet):
        def disk_full(self) -> str | None:
            return "the disk holding X is full" if full["now"] else None

    w = Watcher(
        manifest=m,
        store=b.store,
        queue=b.queue,
        events=b.events,
        fleet=Fleet(tmp_path / "store"),
        clock=clock,
    )
    w.poll()
    full["now"] = True
    w.poll()
    clock.advance(9)
    w.poll()  # full for a moment: the workers wait and so does the watch
    full["now"] = False
    w.poll()  # space came back
    full["now"] = True
    w.poll()  # full again: its time starts over
    clock.advance(9)
    w.poll()
    clock.advance(1.5)
    with pytest.raises(DiskFull, match=f"the disk holding X is full.*runner watch {m.run_id}"):
        w.poll()


def test_the_poll_that_sees_the_end_stops_no_worker_the_drain_does(tmp_path: Path) -> None:
    """Once every shard is settled the watch confirms it and returns; its workers go at the
    run's end (drain_fleet), after the caller had its values, not from inside that poll."""
    from tests.unit.test_asks import Group

    b = open_local(tmp_path / "store")
    m = _run(b, tmp_path, 2)
    fleet = Group("w1", "w2")
    w = Watcher(manifest=m, store=b.store, queue=b.queue, events=b.events, fleet=fleet)
    w.poll()
    assert fleet.deleted == []  # two shards queued: both workers wanted
    for worker, shard in (("w1", "s000"), ("w2", "s001")):
        _commit(b, m.run_id, shard)
        b.events.publish(Event(kind="succeeded", worker=worker, run_id=m.run_id, shard_id=shard))
        b.events.publish(Event(kind="idle", worker=worker, run_id=m.run_id))
    assert w.poll().finished
    assert fleet.deleted == []
    w.drain_fleet(wait=False)
    assert sorted(fleet.deleted) == ["w1", "w2"]
