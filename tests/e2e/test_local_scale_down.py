"""Scaling down never stops a local worker that took a shard after the runner looked.

The runner deletes a worker it found idle once the queue's lease records say it holds nothing;
a shard re-queued at that moment (another worker's failed attempt, say) used to be taken by
the worker between that look and its stop, and run again elsewhere as a preempted attempt. The
look now fences the worker in the same step (:meth:`LocalQueue.fence`): what comes after the
look goes to another worker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.backends.local.fleet import LocalFleet
from runner.engine import runs
from runner.engine.release import Release
from runner.engine.reports import shard_reports
from runner.engine.run_view import RunView
from tests.e2e.conftest import make_task, wait_for
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.clock import SYSTEM_CLOCK
from worker.protocol import RunOptions, Shard

pytestmark = pytest.mark.e2e

# Shard 2 holds until the test lets it go; the others end at once.
TASK = """
import os, time
from pathlib import Path

def run(shard):
    while shard.index == 2 and not Path(os.environ["GO_FLAG"]).exists():
        time.sleep(0.05)
"""


def _attempts(b: Backends, run_id: str) -> dict[str, list[str]]:
    """Each shard's attempts' states, oldest first (a preempted one: the race of old)."""
    return {r.id: [a.state for a in r.attempts] for r in shard_reports(b.store, run_id)}


def test_a_shard_requeued_as_an_idle_worker_is_deleted_runs_on_another_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    go = tmp_path / "go"
    monkeypatch.setenv("GO_FLAG", str(go))
    root = tmp_path / "store"
    b = open_local(root)
    manifest = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=make_task(tmp_path / "task", TASK),
        shards=(Shard(id=f"s{i}", index=i) for i in range(3)),
        options=RunOptions(),
    )
    run_id = manifest.run_id
    # Shard 2's message is held back, to come back the moment the runner deletes a worker.
    deliveries = {d.message.shard_id: d for d in b.queue.receive(3, 0, worker="held-back")}
    for shard in ("s0", "s1"):
        b.queue.nack(deliveries[shard])
    fleet = LocalFleet(root, run_id=run_id, idle_timeout=60)
    real_delete = fleet.delete

    def delete_late(names: object) -> None:
        # The runner descheduled after its look: the shard comes back and is taken first.
        b.queue.nack(deliveries["s2"])
        wait_for(lambda: _attempts(b, run_id)["s2"], 30, "shard 2 started")
        real_delete(names)  # type: ignore[arg-type]

    monkeypatch.setattr(fleet, "delete", delete_late)
    try:
        first, second = fleet.grow(2)
        wait_for(lambda: runs.committed(b.store, run_id) == {"s0", "s1"}, 60, "two commits")
        release = Release(RunView(run_id), run_id, SYSTEM_CLOCK, silence=70.0)
        release.delete(fleet, [first])  # idle and holding nothing as it is looked at
        assert (b.queue.leases(run_id) or {}) == {"s2": second}  # not the worker going
        wait_for(lambda: first not in {i.name for i in fleet.instances()}, 30, "the delete")
        go.touch()  # once the deleted worker is gone: a shard it took would be preempted
        wait_for(lambda: "s2" in runs.committed(b.store, run_id), 60, "shard 2's commit")
        assert _attempts(b, run_id) == {s: ["succeeded"] for s in ("s0", "s1", "s2")}
    finally:
        real_delete(i.name for i in fleet.instances())
        fleet.wait_empty(30)
        fleet.close()
