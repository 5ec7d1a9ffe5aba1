"""A local cancel: it keeps the promise it states, and nothing that ends after it is the run's.

`runner cancel` returns once the run's running attempts have stopped, and says so; an attempt
that ends right after a cancel never commits, however short it ran (the worker reads the run
afresh before each commit); and a combine of a cancelled run leaves out any shard whose attempt
ended after the cancel, should one have committed in the moment the cancel was being written.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.engine import runs
from runner.engine.shards import from_count
from runner.results.combine import combine_run
from tests.e2e.conftest import Cli, alive, make_task, wait_for
from worker.agent.files import seal_outputs
from worker.backends.local.backend import open_local
from worker.clock import FakeClock
from worker.ledger import Finished
from worker.protocol import AttemptState, RunOptions

pytestmark = pytest.mark.e2e

# Records its pid, runs a while, then waits for the test's gate file and writes an output.
GATED_TASK = """
import os, time
from pathlib import Path

def run(shard):
    Path(shard.params["pids"], str(shard.index)).write_text(str(os.getpid()))
    time.sleep(float(shard.params["busy"]))
    while not os.path.exists(shard.params["gate"]):
        time.sleep(0.02)
    (Path(shard.output_dir) / "done.txt").write_text("done\\n")
"""


def _gated(cli: Cli, tmp_path: Path, shards: int, busy: float) -> tuple[str, Path, Path]:
    """A detached run of GATED_TASK, once each of its shards' tasks has started."""
    task = make_task(tmp_path / "gated", GATED_TASK)
    pids, gate = tmp_path / "pids", tmp_path / "gate"
    pids.mkdir()
    params = tmp_path / "params.jsonl"
    row = f'{{"pids": "{pids}", "gate": "{gate}", "busy": {busy}}}\n'
    params.write_text(row * shards)
    r = cli("submit", str(task), "--params", str(params), "--workers", str(shards), "--detach")
    assert r.code == 0, r.stderr
    wait_for(lambda: len(list(pids.iterdir())) == shards, what="every task started")
    return r.run_id, pids, gate


def test_cancel_returns_once_the_running_tasks_have_stopped(cli: Cli, tmp_path: Path) -> None:
    run_id, pids, _gate = _gated(cli, tmp_path, shards=2, busy=0)
    tasks = [int(p.read_text()) for p in pids.iterdir()]
    r = cli("cancel", run_id)
    assert r.code == 0, r.stderr
    # The tasks would wait for the gate forever: the cancel ended them, before it returned.
    assert f"run {run_id} cancelled (no shard queued; its 2 running attempts stopped)" in r.stderr
    assert not [pid for pid in tasks if alive(pid)]
    assert not cli.running_attempts()
    assert cli.records(f"runs/{run_id}/shards/*/result.json") == {}
    assert {s["reason"] for s in cli.status(run_id)["shards"]} == {"run cancelled"}


def test_cancel_of_a_run_that_is_over_leaves_it_as_it_is(cli: Cli, tmp_path: Path) -> None:
    """A finished run stays finished (it read as cancelled, and `watch` then said to retry
    it), a halted one keeps why it halted (its reason was erased)."""
    task = make_task(tmp_path / "quick", "def run(shard):\n    pass\n")
    done = cli("submit", str(task), "--shards", "1", "--workers", "1")
    assert done.code == 0, done.stderr
    r = cli("cancel", done.run_id)
    assert r.code == 0, r.stderr
    assert f"run {done.run_id} is finished already: nothing to cancel" in r.stderr
    assert cli.status(done.run_id)["state"] == "finished"
    assert cli("watch", done.run_id).code == 0
    bad = make_task(tmp_path / "bad", "def run(shard):\n    raise ValueError('nope')\n")
    halted = cli("submit", str(bad), "--shards", "3")
    before = cli.status(halted.run_id)
    assert before["state"] == "cancelled" and "ValueError: nope" in before["halted"]
    r = cli("cancel", halted.run_id)
    assert r.code == 0 and "is halted already: nothing to cancel" in r.stderr, r.stderr
    assert cli.status(halted.run_id)["halted"] == before["halted"]


@pytest.mark.parametrize("busy", [0.0, 2.5], ids=["short", "long"])
def test_a_task_that_ends_right_after_the_cancel_never_commits(
    cli: Cli, tmp_path: Path, busy: float
) -> None:
    run_id, _pids, gate = _gated(cli, tmp_path, shards=2, busy=busy)
    backends = open_local(cli.store)
    try:  # the cancel as `runner cancel` writes it, without waiting for the tasks to stop
        runs.cancel(backends.store, backends.queue, run_id)
    finally:
        backends.close()
    gate.touch()  # the tasks end at once, long before the worker looks at the run again

    def settled() -> int:  # attempts that committed, and those that ended otherwise
        ended = cli.records(f"runs/{run_id}/shards/*/attempts/*/status.json").values()
        done = cli.records(f"runs/{run_id}/shards/*/result.json")
        return len(done) + sum(a["state"] != "running" for a in ended)

    wait_for(lambda: settled() == 2, what="both attempts to settle")
    assert cli.records(f"runs/{run_id}/shards/*/result.json") == {}
    assert {s["reason"] for s in cli.status(run_id)["shards"]} == {"run cancelled"}


def test_combine_of_a_cancelled_run_leaves_out_attempts_that_ended_after_it(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    backends = open_local(tmp_path / "store", clock=clock)
    store, ledger = backends.store, backends.ledger
    task = make_task(tmp_path / "task", "def run(shard):\n    pass\n")
    manifest = runs.create_run(
        store=store,
        queue=backends.queue,
        task_dir=task,
        shards=from_count(2),
        options=RunOptions(),
        clock=clock,
    )
    run_id = manifest.run_id
    deliveries = sorted(backends.queue.receive(2, 0, worker="w"), key=lambda d: d.message.shard_id)
    claims = ledger.claim_many(
        [(run_id, d.message.shard_id, 1, manifest.bundle) for d in deliveries], worker="w"
    )

    def commit(n: int) -> None:  # shard n's attempt ends now, writes part-n.csv and commits
        shard_id, (attempt, started) = deliveries[n].message.shard_id, claims[n]
        out = tmp_path / f"out-{n}"
        out.mkdir()
        (out / "rows.csv").write_text(f"shard {n}\n")
        outputs = seal_outputs(store, run_id, shard_id, attempt, out, contained=False)
        finished = Finished(
            delivery=deliveries[n],
            attempt=attempt,
            started=started,
            finished=clock.time(),
            state=AttemptState.SUCCEEDED,
            worker="w",
            max_attempts=3,
            outputs=outputs,
            bundle=manifest.bundle,
        )
        ledger.settle([finished])

    try:
        clock.advance(1)
        commit(0)  # ended before the cancel: the run's
        clock.advance(1)
        runs.cancel(store, backends.queue, run_id, clock=clock)
        clock.advance(0.5)
        commit(1)  # ended after it, and slipped its commit in past the worker's look
        assert len(runs.committed(store, run_id)) == 2
        said: list[str] = []
        combined = combine_run(store, runs.load_manifest(store, run_id), say=said.append)
    finally:
        backends.close()
    assert (combined.shards, combined.missing, combined.late) == (1, 1, 1)
    assert (tmp_path / "store" / "runs" / run_id / "combined" / "rows.csv").read_text() == (
        "shard 0\n"
    )
    assert any("ended after the run was cancelled" in line for line in said), said
