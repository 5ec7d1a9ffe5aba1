"""The runner's side of the promises, through the CLI with real worker processes: an interrupted
submit is finished by `watch` (or `retry`), a frozen worker does not stall a run, a lost shard is
found and run, a dead worker's attempt shows as lost, a full disk is one clear line and nothing
is lost, a broken run.json is named, and concurrent submits keep their events and names apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.backends.local.fleet import LocalFleet
from tests.e2e.conftest import Cli, alive, make_task, wait_for
from worker.backends.local.backend import local_run_events

GATED = """
import os, time
from pathlib import Path

def run(shard):
    print("shard", shard.index, "waits", flush=True)
    while not os.path.exists(GATE):  # held until the test lets go
        time.sleep(0.02)
    (Path(shard.output_dir) / "done.txt").write_text(f"{shard.index}\\n")
"""

NOOP = """
def run(shard):
    pass
"""


def _gated(tmp_path: Path, gate: Path) -> Path:
    """A task whose shards run until ``gate`` exists."""
    return make_task(tmp_path / "task", GATED.replace("GATE", repr(str(gate))))


def _db(cli: Cli) -> sqlite3.Connection:
    return sqlite3.connect(cli.store / "queue.db", timeout=30)


def _records(cli: Cli, run_id: str, suffix: str) -> list[dict[str, Any]]:
    with contextlib.closing(_db(cli)) as db:
        rows = db.execute(
            "SELECT data FROM records WHERE key LIKE ? AND key LIKE ?",
            (f"runs/{run_id}/shards/%", f"%{suffix}"),
        ).fetchall()
    return [json.loads(bytes(data)) for (data,) in rows]


def _running(cli: Cli, run_id: str) -> list[dict[str, Any]]:
    return [a for a in _records(cli, run_id, "/status.json") if a["state"] == "running"]


def _manifest(cli: Cli, run_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cli.store / "runs" / run_id / "run.json").read_text())
    return data


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate(timeout=30)


def _counts(cli: Cli, run_id: str) -> dict[str, int]:
    counts: dict[str, int] = cli.status(run_id)["counts"]
    return counts


# Past one publish batch: the runner is killed while it pauses after the first, a pause it never
# comes back from (the test hook CFLOW_PUBLISH_PAUSE). Batches of 10 (CFLOW_PUBLISH_BATCH) make
# the same boundary as 1,000 a batch with 25 shards to run.
SHARDS, BATCH = 25, 10


def test_a_runner_killed_while_publishing_is_finished_by_watch(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", NOOP)
    cli.env.update(CFLOW_PUBLISH_PAUSE="3600", CFLOW_PUBLISH_BATCH=str(BATCH))
    proc = cli.start("submit", str(task), "--shards", str(SHARDS), "--workers", "2")
    run_id = _first_line(proc)  # printed before publishing starts
    assert run_id.startswith("r")
    wait_for(lambda: _manifest(cli, run_id)["published"] >= BATCH, what="a batch published")
    _kill(proc)
    cli.env.pop("CFLOW_PUBLISH_PAUSE")
    published = _manifest(cli, run_id)["published"]
    assert published == BATCH
    listed = cli("runs")
    assert f"publishing ({BATCH}/{SHARDS})" in listed.stdout, listed.stdout

    watched = cli("watch", run_id, timeout=240)
    assert watched.code == 0, watched.stderr
    assert "interrupted while publishing" in watched.stderr
    assert _counts(cli, run_id)["succeeded"] == SHARDS
    results = _records(cli, run_id, "/result.json")
    assert len(results) == len({r["shard_id"] for r in results}) == SHARDS  # exactly once
    assert "active" not in cli("runs").stdout.split(run_id)[1].splitlines()[0]


def test_retry_of_a_run_killed_while_publishing_finishes_it(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", NOOP)
    cli.env.update(CFLOW_PUBLISH_PAUSE="3600", CFLOW_PUBLISH_BATCH=str(BATCH))
    proc = cli.start("submit", str(task), "--shards", str(SHARDS))
    run_id = _first_line(proc)
    wait_for(lambda: _manifest(cli, run_id)["published"] == BATCH, what="a batch published")
    _kill(proc)
    cli.env.pop("CFLOW_PUBLISH_PAUSE")
    retried = cli("retry", run_id, "--failed", timeout=180)
    assert retried.code == 0, retried.stderr
    assert "still going" not in retried.stderr
    assert _counts(cli, run_id)["succeeded"] == SHARDS


def test_a_frozen_worker_does_not_stall_the_run(cli: Cli, tmp_path: Path) -> None:
    cli.env.update(CFLOW_LEASE_SECONDS="3", CFLOW_HEARTBEAT_SECONDS="0.5")  # a lease to lapse
    gate = tmp_path / "gate"
    proc = cli.start("submit", str(_gated(tmp_path, gate)), "--shards", "3", "--workers", "1")
    run_id = _first_line(proc)
    (attempt,) = wait_for(lambda: _running(cli, run_id), what="an attempt running")
    frozen = cli.workers()[attempt["worker"]]
    os.kill(frozen, signal.SIGSTOP)  # its lease lapses: nothing extends it
    gate.touch()  # what runs now runs to its end, but not on the frozen worker
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert proc.returncode == 0, stderr
    assert _counts(cli, run_id)["succeeded"] == 3
    wait_for(lambda: not alive(frozen), timeout=30, what="the thawed worker to stop")


def test_a_lost_shard_is_found_and_run(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    task = _gated(tmp_path, gate)
    submitted = cli("submit", str(task), "--shards", "4", "--workers", "1", "--detach")
    assert submitted.code == 0, submitted.stderr
    run_id = submitted.run_id
    wait_for(lambda: _running(cli, run_id), what="an attempt running")  # one held, three not
    with contextlib.closing(_db(cli)) as db, db:
        cur = db.execute(
            "DELETE FROM messages WHERE id = (SELECT MAX(id) FROM messages"
            " WHERE run_id = ? AND lease IS NULL)",
            (run_id,),
        )
        assert cur.rowcount == 1  # a message nobody holds, gone as with a lost queue file
    gate.touch()
    watched = cli("watch", run_id, timeout=120)
    assert watched.code == 0, watched.stderr
    assert _counts(cli, run_id)["succeeded"] == 4


def test_a_dead_workers_attempt_is_lost_and_follow_returns(cli: Cli, tmp_path: Path) -> None:
    task = _gated(tmp_path, tmp_path / "never")
    submitted = cli("submit", str(task), "--shards", "1", "--workers", "1", "--detach")
    run_id = submitted.run_id
    (attempt,) = wait_for(lambda: _running(cli, run_id), what="an attempt running")
    os.kill(cli.workers()[attempt["worker"]], signal.SIGKILL)
    follow = cli("logs", run_id, "--shard", attempt["shard_id"], "--follow", timeout=30)
    assert follow.code == 0 and "is gone" in follow.stderr, follow.stderr
    assert _counts(cli, run_id)["lost"] == 1
    assert "lost" in cli("status", run_id).stdout
    cli("cancel", run_id)


def test_concurrent_submits_keep_their_events_and_worker_names_apart(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "task", "import time\n\ndef run(shard):\n    time.sleep(0.2)\n")
    procs = [cli.start("submit", str(task), "--shards", "12", "--workers", "3") for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert "12/12 shards succeeded" in stderr
    run_ids = [stdout.split()[0] for stdout, _ in results]
    for run_id, other in (run_ids, run_ids[::-1]):
        assert _counts(cli, run_id)["succeeded"] == 12
        # Neither runner's scale-down stopped a worker busy with the other's shard.
        assert "preempted" not in cli.attempt_states(run_id)
        bus = local_run_events(cli.store, run_id, since=0)
        try:
            seen = bus.pull(100_000)
        finally:
            bus.close()
        done = {e.shard_id for e in seen if e.kind == "succeeded"}
        assert len(done) == 12  # every event of its run, though the other watcher read too
        assert all(e.run_id in (run_id, None) for e in seen) and other != run_id


def test_two_runners_growing_one_local_fleet_never_share_a_name(tmp_path: Path) -> None:
    fleets = [LocalFleet(tmp_path / "store", idle_timeout=1) for _ in range(2)]
    names: list[list[str]] = [[], []]
    threads = [
        threading.Thread(target=lambda k=k: names[k].extend(fleets[k].grow(4))) for k in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert len(set(names[0] + names[1])) == 8
    finally:
        for fleet in fleets:
            fleet.delete(n for n in names[0] + names[1])
        assert fleets[0].wait_empty(30)


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        # Mounting needs root (CAP_SYS_ADMIN); a CI must give it: this is the only test that
        # fills a real disk under the product.
        why = f"cannot mount a small tmpfs here ({mounted.stderr.strip()})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true: {why}; a full disk must be tested", pytrace=False)
        pytest.skip(f"{why}; a full disk is untested")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 65536)
    return filler


QUIET_GATED = """
import os, time
from pathlib import Path

def run(shard):  # writes nothing on the store's disk: a task's own writes are its business
    while not os.path.exists(GATE):
        time.sleep(0.02)
    Path(RAN, str(shard.index)).touch()
"""


def test_a_full_disk_is_one_clear_line_and_nothing_is_lost(cli: Cli, tmp_path: Path) -> None:
    gate, ran = tmp_path / "gate", tmp_path / "ran"  # off the small disk
    ran.mkdir()
    body = QUIET_GATED.replace("GATE", repr(str(gate))).replace("RAN", repr(str(ran)))
    task = make_task(tmp_path / "task", body)
    with _small_disk(tmp_path / "disk", "16m") as disk:
        cli.env["CFLOW_STORE"] = str(disk / "store")
        cli.store = disk / "store"
        submitted = cli("submit", str(task), "--shards", "6", "--workers", "1", "--detach")
        assert submitted.code == 0, submitted.stderr
        run_id = submitted.run_id
        wait_for(lambda: _running(cli, run_id), what="an attempt running")
        filler = _fill(disk)  # in the middle of the run
        full = f"error: the disk holding {cli.store} is full"
        # No shard can end while the gate is shut, so the run cannot finish first: the watch
        # sees the disk stay full and stops with its one line.
        watched = cli("watch", run_id, timeout=120)
        assert watched.code == 2, watched.stderr
        assert watched.stderr.strip().splitlines()[-1] == (
            f"{full}: the workers wait; free some space and the run goes on where it stopped;"
            f" watch it again with `runner watch {run_id}`"
        ), watched.stderr
        assert "Traceback" not in watched.stderr
        other = cli("submit", str(task), "--shards", "2", "--detach")
        assert other.code == 2, other.stderr
        said = other.stderr.strip().splitlines()
        assert said[:-1] == [f"cflow: local backend, store {cli.store} (no deployment found)"]
        assert re.fullmatch(
            rf"error: the disk holding {re.escape(str(cli.store))}(/runs/r[0-9a-f-]+)? is full;"
            r" free some space, then `runner watch` or `runner retry --failed` goes on where"
            r" the run stopped",
            said[-1],
        ), said
        gate.touch()  # the running shard ends while the disk is full: settling it must wait
        wait_for(lambda: list(ran.iterdir()), what="the running shard to end")

        filler.unlink()  # space freed: the run goes on where it stopped
        watched = cli("watch", run_id, timeout=120)
        assert watched.code == 0, watched.stderr
        assert "Traceback" not in watched.stderr
        counts = _counts(cli, run_id)
        assert (counts["succeeded"], counts["failed"], counts["lost"]) == (6, 0, 0)
        results = _records(cli, run_id, "/result.json")
        assert sorted(r["shard_id"] for r in results) == [f"{i:05d}" for i in range(6)]
        assert "failed" not in cli.attempt_states(run_id)  # the disk failed no attempt
        listed = cli("runs", "--json")  # the submit that found the disk full left no run
        assert [r["run_id"] for r in json.loads(listed.stdout)] == [run_id], listed.stderr
        assert "broken" not in listed.stderr, listed.stderr


def test_a_broken_run_json_is_named(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", NOOP)
    submitted = cli("submit", str(task), "--shards", "1")
    assert submitted.code == 0, submitted.stderr
    run_id = submitted.run_id
    manifest = cli.store / "runs" / run_id / "run.json"
    manifest.write_text(manifest.read_text()[:25])  # truncated
    for command in (("status", run_id), ("watch", run_id)):
        result = cli(*command)
        assert result.code == 2 and f"{manifest} is broken" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    listed = cli("runs")
    assert "no runs yet" not in listed.stderr and f"broken run: {manifest}" in listed.stderr


def test_a_sigkilled_workers_shard_runs_again_without_waiting_out_its_lease(
    cli: Cli, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    cli.env["CFLOW_LEASE_SECONDS"] = "600"  # only the fleet's release can bring it back in time
    proc = cli.start(
        "submit", str(_gated(tmp_path, gate)), "--shards", "3", "--workers", "2",
        "--max-attempts", "1",
    )  # fmt: skip
    run_id = _first_line(proc)
    running = wait_for(lambda: len(_running(cli, run_id)) == 2 and _running(cli, run_id))
    victim = running[0]
    pid = cli.workers()[victim["worker"]]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the killed worker to be gone")
    gate.touch()  # its shard cannot have ended before: it runs again on another worker
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    shards = cli.status(run_id)["shards"]
    assert [s["state"] for s in shards] == ["succeeded"] * 3  # a kill is not a failure
    killed = next(s for s in shards if s["id"] == victim["shard_id"])
    assert len(killed["attempts"]) == 2  # the killed attempt, then one on another worker
    assert "(0 preempted, 1 retried)" in stderr  # it said 0 retried: a lost attempt is unsaid
    combined = (cli.store / "runs" / run_id / "combined" / "done.txt").read_text().split()
    assert sorted(combined) == ["0", "1", "2"]  # exactly once each


STRAGGLER = """
import time

def run(shard):
    if shard.index == 0 and shard.attempt == 1:
        time.sleep(120)  # a slow machine: its backup, attempt 2, is quick
    time.sleep(0.05)
"""


def test_a_backups_loser_is_let_go_as_discarded_not_preempted(cli: Cli, tmp_path: Path) -> None:
    """The straggler's first attempt, stopped once its backup committed, was recorded
    ``preempted`` ("worker stopped (preemption)"), though nothing was preempted."""
    task = make_task(tmp_path / "t", STRAGGLER)
    done = cli("submit", str(task), "--shards", "30", "--workers", "2", "--speculate")
    assert done.code == 0, done.stderr
    assert "(0 preempted, 0 retried)" in done.stderr
    straggler = next(s for s in cli.status(done.run_id)["shards"] if s["index"] == 0)
    first, backup = sorted(straggler["attempts"], key=lambda a: a["attempt"])
    assert backup["state"] == "succeeded"
    assert first["state"] == "discarded", first
    assert first["reason"] == "stopped: another attempt of the shard committed first"
