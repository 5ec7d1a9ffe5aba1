"""The runner's side of the promises, through the CLI with real worker processes: an interrupted
submit is finished by `watch` (or `retry`), a frozen worker does not stall a run, a lost shard is
found and run, a dead worker's attempt shows as lost, a full disk is one clear line and nothing
is lost, a broken run.json is named, and concurrent submits keep their events and names apart.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.backends.local.fleet import LocalFleet
from tests.e2e.conftest import Cli, make_task, wait_for
from worker.backends.local.backend import local_run_events

SLEEPY = """
import time

def run(shard):
    time.sleep(float(shard.params.get("index", 0)) * 0 + SECONDS)
"""

NOOP = """
def run(shard):
    pass
"""


def _sleepy(tmp_path: Path, seconds: float) -> Path:
    return make_task(tmp_path / "task", SLEEPY.replace("SECONDS", repr(seconds)))


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


def test_a_runner_killed_while_publishing_is_finished_by_watch(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", NOOP)
    cli.env["CFLOW_PUBLISH_PAUSE"] = "2"  # the documented test hook: a slow publisher
    proc = cli.start("submit", str(task), "--shards", "3000", "--workers", "2")
    run_id = _first_line(proc)  # printed before publishing starts
    assert run_id.startswith("r")
    wait_for(lambda: _manifest(cli, run_id)["published"] >= 1000, what="a batch published")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    cli.env.pop("CFLOW_PUBLISH_PAUSE")
    published = _manifest(cli, run_id)["published"]
    assert published < 3000
    listed = cli("runs")
    assert f"publishing ({published}/3000)" in listed.stdout, listed.stdout

    watched = cli("watch", run_id, timeout=240)
    assert watched.code == 0, watched.stderr
    assert "interrupted while publishing" in watched.stderr
    assert _counts(cli, run_id)["succeeded"] == 3000
    results = _records(cli, run_id, "/result.json")
    assert len(results) == len({r["shard_id"] for r in results}) == 3000  # exactly once
    assert len(_records(cli, run_id, "/status.json")) <= 4000  # at most a batch ran twice
    assert "active" not in cli("runs").stdout.split(run_id)[1].splitlines()[0]


def test_retry_of_a_run_killed_while_publishing_finishes_it(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "task", NOOP)
    cli.env["CFLOW_PUBLISH_PAUSE"] = "30"
    proc = cli.start("submit", str(task), "--shards", "1500")
    run_id = _first_line(proc)
    wait_for(lambda: _manifest(cli, run_id)["published"] == 1000, what="a batch published")
    _kill(proc)
    cli.env.pop("CFLOW_PUBLISH_PAUSE")
    retried = cli("retry", run_id, "--failed", timeout=180)
    assert retried.code == 0, retried.stderr
    assert "still going" not in retried.stderr
    assert _counts(cli, run_id)["succeeded"] == 1500


def test_a_frozen_worker_does_not_stall_the_run(cli: Cli, tmp_path: Path) -> None:
    task = _sleepy(tmp_path, 1.5)
    proc = cli.start("submit", str(task), "--shards", "3", "--workers", "1")
    run_id = _first_line(proc)
    (attempt,) = wait_for(lambda: _running(cli, run_id), what="an attempt running")
    frozen = cli.workers()[attempt["worker"]]
    os.kill(frozen, signal.SIGSTOP)  # its lease (3 s in these tests) lapses: nothing extends it
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen, signal.SIGCONT)
    assert proc.returncode == 0, stderr
    assert _counts(cli, run_id)["succeeded"] == 3
    wait_for(lambda: not _alive(frozen), timeout=30, what="the thawed worker to stop")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


def test_a_lost_shard_is_found_and_run(cli: Cli, tmp_path: Path) -> None:
    task = _sleepy(tmp_path, 0.5)
    submitted = cli("submit", str(task), "--shards", "4", "--workers", "1", "--detach")
    assert submitted.code == 0, submitted.stderr
    run_id = submitted.run_id
    with contextlib.closing(_db(cli)) as db, db:
        cur = db.execute(
            "DELETE FROM messages WHERE id = (SELECT MAX(id) FROM messages"
            " WHERE run_id = ? AND lease IS NULL)",
            (run_id,),
        )
        assert cur.rowcount == 1  # a message nobody holds, gone as with a lost queue file
    watched = cli("watch", run_id, timeout=120)
    assert watched.code == 0, watched.stderr
    assert _counts(cli, run_id)["succeeded"] == 4


def test_a_dead_workers_attempt_is_lost_and_follow_returns(cli: Cli, tmp_path: Path) -> None:
    task = _sleepy(tmp_path, 30)
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
    task = _sleepy(tmp_path, 0.2)
    procs = [cli.start("submit", str(task), "--shards", "12", "--workers", "3") for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for p, (_, stderr) in zip(procs, results, strict=True):
        assert p.returncode == 0, stderr
        assert "12/12 shards succeeded" in stderr
    run_ids = [stdout.split()[0] for stdout, _ in results]
    for run_id, other in (run_ids, run_ids[::-1]):
        assert _counts(cli, run_id)["succeeded"] == 12
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
        # Mounting needs root with CAP_SYS_ADMIN; a CI that has it must run this test.
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"CI=true but tmpfs mount failed: {mounted.stderr.strip()}")
        pytest.skip(
            f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); a full disk is untested"
        )
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


def test_a_full_disk_is_one_clear_line_and_nothing_is_lost(cli: Cli, tmp_path: Path) -> None:
    task = _sleepy(tmp_path, 1.0)
    with _small_disk(tmp_path / "disk", "16m") as disk:
        cli.env["CFLOW_STORE"] = str(disk / "store")
        cli.store = disk / "store"
        submitted = cli("submit", str(task), "--shards", "6", "--workers", "1", "--detach")
        assert submitted.code == 0, submitted.stderr
        run_id = submitted.run_id
        filler = _fill(disk)  # while the run is going: its workers' writes fail too
        watched = cli("watch", run_id, timeout=120)
        assert "Traceback" not in watched.stderr, watched.stderr
        if watched.code == 2:  # the runner's own write failed: it says why, in one line
            assert "error: the disk holding" in watched.stderr and "is full" in watched.stderr
        other = cli("submit", str(task), "--shards", "2", "--detach")
        assert other.code == 2 and "full" in other.stderr, other.stderr
        assert "Traceback" not in other.stderr
        assert len(other.stderr.strip().splitlines()) <= 2, other.stderr

        filler.unlink()  # space freed: the run goes on where it stopped
        watched = cli("watch", run_id, timeout=120)
        assert "Traceback" not in watched.stderr, watched.stderr
        if _counts(cli, run_id)["failed"]:
            retried = cli("retry", run_id, "--failed", timeout=120)
            assert retried.code == 0, retried.stderr
        assert _counts(cli, run_id)["succeeded"] == 6


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
    task = _sleepy(tmp_path, 2)
    cli.env["CFLOW_LEASE_SECONDS"] = "600"  # only the fleet's release can bring it back in time
    proc = cli.start("submit", str(task), "--shards", "2", "--workers", "2")
    run_id = _first_line(proc)
    running = wait_for(lambda: len(_running(cli, run_id)) == 2 and _running(cli, run_id))
    os.kill(cli.workers()[running[0]["worker"]], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert _counts(cli, run_id)["succeeded"] == 2
