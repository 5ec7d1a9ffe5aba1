"""The run's doorbell: a local worker whose settlement leaves its run with no message rings it,
and the watch waiting on it looks at once instead of at its next pace."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner.backends.local.fleet import LocalFleet
from runner.engine import runs
from runner.engine.watch import Snapshot, Watcher
from tests.e2e.conftest import make_task
from worker.backends.local.backend import local_run_events, open_local
from worker.backends.local.bell import Bell, bell_path, ring
from worker.ledger import Finished
from worker.protocol import AttemptState, RunOptions, Shard, WorkMessage

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
