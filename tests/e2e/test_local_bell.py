"""The doorbells: a local worker whose settlement leaves its run with no message rings the run's,
and the watch waiting on it looks at once instead of at its next pace; a publish rings its run's
workers' work bells, and a worker waiting for work takes it at once instead of at its next poll."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner.backends.local.fleet import LocalFleet
from runner.engine import runs
from runner.engine.watch import Snapshot, Watcher
from tests.e2e.conftest import make_task, wait_for
from worker.backends.local import queue as local_queue
from worker.backends.local.backend import local_run_events, open_local
from worker.backends.local.bell import Bell, bell_path, ring, ring_workers, work_bell
from worker.backends.local.queue import LocalQueue
from worker.ledger import Finished
from worker.protocol import AttemptState, RunOptions, Shard, WorkMessage
from worker.queue import Delivery

pytestmark = pytest.mark.e2e


def test_a_bell_rung_from_another_process_ends_the_wait_and_one_nobody_waits_on_is_silent(
    tmp_path: Path,
) -> None:
    ring(tmp_path, ["r-none"])  # no bell: nothing happens
    bell = Bell.open(tmp_path, "r-1")
    assert bell is not None
    try:
        assert not bell.wait(0)
        code = "import sys; from pathlib import Path; from worker.backends.local.bell import ring;"
        code += " ring(Path(sys.argv[1]), ['r-1']); ring(Path(sys.argv[1]), ['r-1'])"
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
        assert bell.wait(30)  # rung twice: both taken by the one wait
        assert not bell.wait(0)
    finally:
        bell.close()
    assert not bell_path(tmp_path, "r-1").exists()
    ring(tmp_path, ["r-1"])  # closed: nobody waits, nothing happens


def test_only_the_settlement_that_leaves_the_run_with_no_message_rings(tmp_path: Path) -> None:
    b = open_local(tmp_path)
    b.queue.publish(WorkMessage("r-1", Shard(id=f"s{i}", index=i).to_dict()) for i in range(2))
    first, second = b.queue.receive(2, 0, worker="w")
    bell = Bell.open(tmp_path, "r-1")
    assert bell is not None
    try:
        for delivery, last in ((first, False), (second, True)):
            ((attempt, started),) = b.ledger.claim_many(
                [("r-1", delivery.message.shard_id, 1, None)], worker="w"
            )
            done = Finished(delivery, attempt, started, started, AttemptState.SUCCEEDED, "w", 3)
            b.ledger.settle([done])
            assert bell.wait(0) is last  # the second: nothing of the run is left
    finally:
        bell.close()


def test_the_watch_sees_the_end_when_the_last_shard_settles_not_at_its_next_look(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    b = open_local(root)
    manifest = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=make_task(tmp_path / "task", "def run(shard):\n    pass\n"),
        shards=(Shard(id=f"s{i}", index=i) for i in range(3)),
        options=RunOptions(),
    )
    events = local_run_events(root, manifest.run_id)
    fleet = LocalFleet(root, run_id=manifest.run_id, idle_timeout=60)
    # Looks a minute apart: without the bell the watch would see the end a minute late.
    watcher = Watcher(
        manifest=manifest, store=b.store, queue=b.queue, events=events, fleet=fleet, max_workers=2,
        reconcile_seconds=60, quiet_poll_seconds=60,
    )  # fmt: skip
    seen: list[Snapshot] = []
    watching = threading.Thread(target=lambda: seen.append(watcher.watch(poll_seconds=60)))
    try:
        watching.start()
        watching.join(30)
        assert seen and seen[0].finished, "the watch did not see the run's end"
        assert not bell_path(root, manifest.run_id).exists()  # gone with the watch
        assert runs.committed(b.store, manifest.run_id) == {"s0", "s1", "s2"}
    finally:
        watcher.drain_fleet(timeout=30)
        watching.join(60)
        events.close()
        fleet.close()


def test_a_work_bell_rings_for_its_runs_workers_only_and_a_stale_one_is_passed_over(
    tmp_path: Path,
) -> None:
    mine = Bell.open(tmp_path, work_bell("r-1", "local-0"))
    other = Bell.open(tmp_path, work_bell("r-10", "local-0"))  # a run whose id starts alike
    os.mkfifo(bell_path(tmp_path, work_bell("r-1", "local-9")))  # its worker was killed
    assert mine is not None and other is not None
    try:
        ring_workers(tmp_path, ["r-1"])  # the stale one has no reader: passed over at once
        assert mine.wait(30)
        assert not other.wait(0)
    finally:
        mine.close()
        other.close()


def test_a_worker_waiting_for_work_takes_a_published_shard_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its polls a minute apart: only the ring can wake it before the test gives up."""
    monkeypatch.setattr(local_queue, "POLL_FIRST", 60.0)
    monkeypatch.setattr(local_queue, "POLL_MOST", 60.0)
    path = tmp_path / "queue.db"
    worker = LocalQueue(path, run_id="r-1")
    got: list[Delivery] = []
    waiting = threading.Thread(target=lambda: got.extend(worker.receive(1, 120, worker="w-0")))
    waiting.start()
    bell = bell_path(tmp_path, work_bell("r-1", "w-0"))
    wait_for(bell.exists, 30, "the worker's work bell")
    runner = LocalQueue(path)
    message = WorkMessage(run_id="r-1", shard=Shard(id="s0", index=0).to_dict())
    runner.publish([message])
    waiting.join(30)
    assert not waiting.is_alive(), "the published shard did not wake the waiting worker"
    assert [d.message for d in got] == [message]
    worker.close()
    assert not bell.exists()  # its bell goes with the worker's queue
    runner.close()
