"""Halting and retrying where they meet other features, through the CLI with real workers.

The halt message says "fix the task, then `runner retry RUN --failed --task DIR`": that path is
walked whole, and so are a retry of the same code, a halt with no runner attached (--detach,
Ctrl-C), `watch` of a halted run and of a run submitted with its own rule, a retry right after
a cancel, and a retry with a task of another kind (task.sh after task.py); and on the emulators,
where the events come through Pub/Sub and the queue cannot drop a run's messages, a detached
run halted by its workers, then retried with the fixed task.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import emulators
from tests.e2e.conftest import Cli, make_task, wait_for
from tests.gcp.conftest import worker_spawner
from tests.gcp.fake_compute import FakeCompute
from tests.gcp.test_gcp_e2e import GROUP, ZONE, Cloud
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import Layout

pytestmark = pytest.mark.e2e

REASON = "ValueError: the input format changed"
BROKEN = """
def run(shard):
    raise ValueError("the input format changed")
"""
FIXED = """
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "v.txt").write_text(f"fixed {shard.index}\\n")
"""
# Blocks until the flag file exists, then fails (or writes "old", with WRITE).
BLOCKED = """
import os, time
from pathlib import Path

def run(shard):
    while not Path(os.environ["FLAG"]).exists():
        time.sleep(0.05)
    if not os.environ.get("WRITE"):
        raise ValueError("the input format changed")
    (Path(shard.output_dir) / "v.txt").write_text(f"old {shard.index}\\n")
"""


def _manifest(cli: Cli, run_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cli.store / "runs" / run_id / "run.json").read_text())
    return data


def _attempts(cli: Cli, run_id: str) -> list[dict[str, Any]]:
    return list(cli.records(f"runs/{run_id}/shards/*/attempts/*/status.json").values())


def _results(cli: Cli, run_id: str) -> dict[str, Any]:
    return cli.records(f"runs/{run_id}/shards/*/result.json")


def _combined(cli: Cli, run_id: str) -> list[str]:
    return (cli.store / "runs" / run_id / "combined" / "v.txt").read_text().splitlines()


def _halted(cli: Cli, run_id: str) -> str | None:
    halted: str | None = _manifest(cli, run_id).get("halted")
    return halted


def test_a_halted_run_retried_with_the_fixed_task_runs_the_fixed_code_to_the_end(
    cli: Cli, tmp_path: Path
) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli("submit", str(broken), "--shards", "8", "--workers", "2")
    assert r.code == 1, r.stderr
    run_id = r.run_id
    assert f"run {run_id} halted: the first 3 attempts all failed with: {REASON}" in r.stderr
    assert f"`runner retry {run_id} --failed --task DIR`" in r.stderr
    first = _manifest(cli, run_id)
    broken_attempts = len(_attempts(cli, run_id))
    assert 3 <= broken_attempts < 8 * 3

    fixed = make_task(tmp_path / "fixed", FIXED)
    again = cli("retry", run_id, "--failed", "--task", str(fixed))
    assert again.code == 0, again.stderr
    assert " halted: " not in again.stderr
    assert "retrying 8 shards" in again.stderr and "8/8 shards succeeded, 0 failed" in again.stderr
    assert "(0 preempted, 0 retried)" in again.stderr  # the halted round's retries are not its
    assert _combined(cli, run_id) == [f"fixed {i}" for i in range(8)]
    after = _manifest(cli, run_id)
    assert after["state"] == "finished" and after["halted"] is None
    assert after["bundle"] != first["bundle"]
    assert [b["sha256"] for b in after["bundles"]] == [first["bundle"], after["bundle"]]
    assert {r["bundle"] for r in _results(cli, run_id).values()} == {after["bundle"]}
    # after the retry only the fixed code ran, on every shard
    fixed_attempts = [a for a in _attempts(cli, run_id) if a["bundle"] == after["bundle"]]
    assert {a["shard_id"] for a in fixed_attempts} == {f"{i:05d}" for i in range(8)}
    assert len(_attempts(cli, run_id)) - len(fixed_attempts) == broken_attempts
    assert cli.status(run_id)["counts"]["succeeded"] == 8


def test_a_retry_of_the_same_task_is_judged_afresh_not_halted_at_once(
    cli: Cli, tmp_path: Path
) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli("submit", str(broken), "--shards", "8", "--workers", "2")
    assert r.code == 1 and "halted" in r.stderr, r.stderr
    before = len(_attempts(cli, r.run_id))
    again = cli("retry", r.run_id, "--failed")
    assert again.code == 1, again.stderr
    assert "runs the same task again; --halt same,fail=3 judges the retried attempts" in (
        again.stderr
    )
    assert f"halted: the first 3 attempts all failed with: {REASON}" in again.stderr
    new = len(_attempts(cli, r.run_id)) - before
    assert 3 <= new < 8 * 3  # three new attempts failed alike, then it stopped again
    assert [b["sha256"] for b in _manifest(cli, r.run_id)["bundles"]] == [
        _manifest(cli, r.run_id)["bundle"]
    ] * 2


def test_a_detached_run_halts_and_watch_says_why(cli: Cli, tmp_path: Path) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli("submit", str(broken), "--shards", "30", "--workers", "2", "--detach")
    assert r.code == 0, r.stderr
    run_id = r.run_id
    # no runner watches: the workers judge the rule on their own attempts
    halted = wait_for(lambda: _halted(cli, run_id), 60, "the workers to halt the run")
    assert halted == f"the first 3 attempts all failed with: {REASON}"
    assert cli.status(run_id)["state"] == "cancelled"
    assert len(_attempts(cli, run_id)) < 30  # not the 90 the run would have burnt

    watched = cli("watch", run_id)
    assert watched.code == 2
    assert f"was halted: the first 3 attempts all failed with: {REASON}" in watched.stderr
    assert f"`runner retry {run_id} --failed --task DIR`" in watched.stderr

    fixed = make_task(tmp_path / "fixed", FIXED)
    again = cli("retry", run_id, "--failed", "--task", str(fixed))
    assert again.code == 0, again.stderr
    assert _combined(cli, run_id) == [f"fixed {i}" for i in range(30)]


def test_a_run_left_by_ctrl_c_still_halts(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "blocked", BLOCKED)
    flag = tmp_path / "flag"
    cli.env["FLAG"] = str(flag)
    proc = cli.start("submit", str(task), "--shards", "20", "--workers", "2")
    wait_for(lambda: len(cli.running_attempts()) == 2, 60, "both workers to start a shard")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "detached" in err, err
    run_id = out.strip()
    flag.touch()  # now every attempt fails alike, with no runner attached
    halted = wait_for(lambda: _halted(cli, run_id), 60, "the workers to halt the run")
    assert halted == f"the first 3 attempts all failed with: {REASON}"
    assert len(_attempts(cli, run_id)) < 20


def test_watch_judges_a_run_by_the_rule_it_was_submitted_with(cli: Cli, tmp_path: Path) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli(
        "submit", str(broken), "--shards", "4", "--workers", "2", "--max-attempts", "2",
        "--halt", "never", "--detach",
    )  # fmt: skip
    assert r.code == 0, r.stderr
    marks = f"runs/{r.run_id}/shards/*/failed.json"
    wait_for(lambda: len(cli.records(marks)) == 4, 60, "every shard to use its attempts")
    assert _halted(cli, r.run_id) is None  # the workers honour --halt never
    watched = cli("watch", r.run_id)  # its 8 failures alike would meet the default rule
    assert watched.code == 1, watched.stderr
    assert " halted: " not in watched.stderr and "0/4 shards succeeded, 4 failed" in watched.stderr


def test_a_retry_with_a_new_task_right_after_a_cancel_runs_only_the_new_code(
    cli: Cli, tmp_path: Path
) -> None:
    """The cancelled run's attempts are still running when the retry starts; they must not
    finish in the retried run with the old code."""
    old = make_task(tmp_path / "old", BLOCKED)
    flag = tmp_path / "flag"
    # A heartbeat long enough that the attempts have not seen the cancel when the retry comes.
    cli.env.update(FLAG=str(flag), WRITE="1", CFLOW_HEARTBEAT_SECONDS="3", CFLOW_LEASE_SECONDS="20")
    r = cli("submit", str(old), "--shards", "4", "--workers", "2", "--detach")
    assert r.code == 0, r.stderr
    wait_for(lambda: len(cli.running_attempts()) == 2, 60, "both workers to start a shard")
    assert cli("cancel", r.run_id).code == 0
    fixed = make_task(tmp_path / "fixed", FIXED)
    again = cli("retry", r.run_id, "--failed", "--task", str(fixed), "--detach")
    assert again.code == 0, again.stderr
    flag.touch()  # an old attempt still running would now commit "old"
    watched = cli("watch", r.run_id)
    assert watched.code == 0, watched.stderr
    assert _combined(cli, r.run_id) == [f"fixed {i}" for i in range(4)]
    bundle = _manifest(cli, r.run_id)["bundle"]
    assert {res["bundle"] for res in _results(cli, r.run_id).values()} == {bundle}
    old_attempts = [a for a in _attempts(cli, r.run_id) if a["bundle"] != bundle]
    assert {a["reason"] for a in old_attempts} <= {"run cancelled"}


def test_a_python_run_retried_with_a_shell_task(cli: Cli, tmp_path: Path) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli("submit", str(broken), "--shards", "5", "--workers", "2")
    assert r.code == 1 and "halted" in r.stderr, r.stderr
    shell = make_task(
        tmp_path / "shell",
        """
        #!/usr/bin/env bash
        set -euo pipefail
        echo "shell $CFLOW_SHARD_INDEX" > "$CFLOW_OUTPUT_DIR/v.txt"
        """,
        name="task.sh",
    )
    again = cli("retry", r.run_id, "--failed", "--task", str(shell))
    assert again.code == 0, again.stderr
    assert _manifest(cli, r.run_id)["entry"] == "shell"
    assert _combined(cli, r.run_id) == [f"shell {i}" for i in range(5)]


@pytest.fixture
def cloud(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cloud]:
    """The runner CLI on a fresh emulated deployment whose group starts real workers."""
    d = emulators.new_deployment()
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        d, logs=tmp_path / "vms", group=GROUP, zone=ZONE, endpoint=lambda: holder["endpoint"]
    )
    fake = FakeCompute(project=d.project, group=GROUP, spawn=spawn, zone=ZONE).start()
    holder["endpoint"] = fake.endpoint
    monkeypatch.setenv("CFLOW_COMPUTE_ENDPOINT", fake.endpoint)
    try:
        yield Cloud(d, fake, tmp_path)
    finally:
        fake.stop()


@pytest.mark.emulator
def test_on_google_cloud_a_detached_halted_run_is_retried_with_the_fixed_task(
    cloud: Cloud, tmp_path: Path
) -> None:
    store = GcsStore(json.loads((tmp_path / "cflow-outputs.json").read_text())["bucket"])

    def manifest(run_id: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(store.get(Layout.manifest(run_id)))
        return data

    def attempts(run_id: str) -> list[dict[str, Any]]:
        keys = store.list(Layout.shards_prefix(run_id), suffix="/status.json")
        return [json.loads(store.get(k)) for k in keys]

    broken = make_task(tmp_path / "broken", BROKEN)
    r = cloud("submit", str(broken), "--shards", "8", "--workers", "2", "--detach")
    assert r.code == 0, r.stderr
    run_id = r.run_id
    halted = wait_for(lambda: manifest(run_id)["halted"], 120, "the workers to halt the run")
    assert halted == f"the first 3 attempts all failed with: {REASON}"
    assert len(attempts(run_id)) < 8 * 3
    watched = cloud("watch", run_id)
    assert watched.code == 2 and f"was halted: {halted}" in watched.stderr

    fixed = make_task(tmp_path / "fixed", FIXED)
    again = cloud("retry", run_id, "--failed", "--task", str(fixed), timeout=240)
    assert again.code == 0, again.stderr
    assert "8/8 shards succeeded, 0 failed" in again.stderr and " halted: " not in again.stderr
    # The VMs left idle by the halted round ran the new one: the runner let every one go.
    assert set(cloud.fake.live()) <= set(cloud.fake.deleted), again.stderr
    assert "still stopping" not in again.stderr
    after = manifest(run_id)
    combined = store.get(f"runs/{run_id}/combined/v.txt").decode().splitlines()
    assert combined == [f"fixed {i}" for i in range(8)]
    results = [json.loads(store.get(Layout.result(run_id, s))) for s in _ids(8)]
    assert after["bundle"] != after["bundles"][0]["sha256"]
    assert {res["bundle"] for res in results} == {after["bundle"]}
    assert "preempted" not in {a["state"] for a in attempts(run_id)}


def _ids(n: int) -> list[str]:
    return [f"{i:05d}" for i in range(n)]
