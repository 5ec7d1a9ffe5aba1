"""The watcher's view of a run: events, reconciliation and dead letters, on the local backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner import runs
from runner.watch import Watcher
from worker.backends import open_local
from worker.errors import BackendError
from worker.protocol import Event, RunOptions, RunState, Shard, WorkMessage
from worker.queue import WorkQueue


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
    assert w.busy_workers() == {"w1", "w2"}
    w._apply(Event(kind="succeeded", worker="w1", run_id="r-b", shard_id="s"))
    assert w.busy_workers() == {"w2"}


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


def test_a_failed_publish_cancels_the_half_made_run(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    queue = _BrokenQueue(b.queue)
    shards = (Shard(id=f"s{i}", index=i) for i in range(2500))  # three publish batches
    with pytest.raises(BackendError, match="the run is cancelled"):
        runs.create_run(
            store=b.store,
            queue=queue,
            task_dir=_task(tmp_path),  # type: ignore[arg-type]
            shards=shards,
            options=RunOptions(),
        )
    (manifest,) = runs.list_runs(b.store)
    assert manifest.state == RunState.CANCELLED.value
    assert b.queue.stats().queued == 0  # what went out was purged
