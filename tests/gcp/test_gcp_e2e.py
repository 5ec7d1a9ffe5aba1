"""Whole runs through the ``runner`` CLI on the emulators, with real workers in a fake group.

The fake Compute API "creates" each VM by starting ``python -m worker --backend gcp``, recreates
a VM whose process dies (a Spot preemption), and "deletes" by SIGTERM.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli, make_inputs, make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env, worker_spawner
from tests.gcp.fake_compute import FakeCompute, sleeper
from tests.gcp.faults import FaultPlan
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.vm import report_problem

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

ZONE = "us-central1-a"
GROUP = "cflow-workers"
SHARDS = 200
FLAKY, POISON = 7, 13
LONG = {25, 50, 75, 100, 125, 150, 175}  # long enough to catch their worker busy

TASK = f"""
import os, time
from pathlib import Path

def run(shard):
    i = shard.index
    if i == {POISON}:
        raise RuntimeError("poison shard: always fails")
    if i == {FLAKY} and shard.attempt == 1:
        raise RuntimeError("flaky shard: fails its first attempt")
    if i in {sorted(LONG)!r}:
        marks = Path(os.environ["MARK_DIR"])
        (marks / f"{{os.environ['CFLOW_WORKER_NAME']}}.{{i}}.{{shard.attempt}}").touch()
        time.sleep(4)
    else:
        time.sleep(0.02)
    (Path(shard.output_dir) / "index.txt").write_text(f"{{i}}\\n")
"""


COPY_TASK = """
import shutil
from pathlib import Path

def run(shard):
    shutil.copyfile(shard.input, Path(shard.output_dir) / "rows.csv")
"""


class Cloud(Cli):
    """The runner CLI pointed at one emulated deployment and its fake group."""

    def __init__(self, d: Deployment, fake: FakeCompute, workdir: Path):
        super().__init__(workdir)
        self.fake = fake
        outputs = workdir / "cflow-outputs.json"
        outputs.write_text(json.dumps(d.outputs(zone=ZONE, group=GROUP)))
        self.env = worker_env(fake.endpoint, CFLOW_BACKEND="gcp", CFLOW_DEPLOYMENT=str(outputs))

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _cloud(
    d: Deployment,
    fake_compute: MakeCompute,
    tmp_path: Path,
    faults: FaultPlan | None = None,
    **spawn_args: Any,
) -> Cloud:
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        d,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
        **spawn_args,
    )
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE, faults=faults)
    holder["endpoint"] = fake.endpoint
    return Cloud(d, fake, tmp_path)


def _states(cloud: Cloud, run_id: str) -> list[str]:
    """Every attempt's state, shard by shard: "preempted" among them means a worker was stopped
    while busy (by Spot, or by a runner scaling down)."""
    return [a["state"] for s in cloud.status(run_id)["shards"] for a in s["attempts"]]


def _busy(marks: Path, exclude: set[str]) -> str:
    """A worker that has just started a long shard (and is not in ``exclude``)."""

    def find() -> str | None:
        for mark in sorted(marks.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
            name = mark.name.split(".")[0]
            if name not in exclude and time.time() - mark.stat().st_mtime < 2:
                return name
        return None

    found: str = wait_for(find, 90, "a busy worker")
    return found


def test_run_survives_preemption_a_killed_worker_a_flaky_and_a_poison_shard(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cloud = _cloud(
        deployment,
        fake_compute,
        tmp_path,
        env={"MARK_DIR": str(marks)},
        extra_args=("--lease-seconds", "10", "--heartbeat", "2"),
    )
    task = make_task(tmp_path / "task", TASK)
    submit = cloud.start(
        "submit", str(task), "--shards", str(SHARDS), "--workers", "4", "--max-attempts", "2"
    )
    try:
        preempted = _busy(marks, set())
        cloud.fake.live()[preempted].send_signal(signal.SIGTERM)  # how Spot preemption begins
        killed = _busy(marks, {preempted})
        cloud.fake.live()[killed].send_signal(signal.SIGKILL)  # a VM that vanishes
        stdout, stderr = submit.communicate(timeout=180)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 1, stderr  # one shard failed
    run_id = stdout.strip().splitlines()[0]

    status = cloud.status(run_id)
    assert status["counts"]["succeeded"] == SHARDS - 1, stderr
    assert status["counts"]["failed"] == 1
    shards = {s["index"]: s for s in status["shards"]}
    assert shards[POISON]["state"] == "failed"
    assert "poison" in (cloud.run("logs", run_id, "--shard", shards[POISON]["id"]).stdout)
    assert shards[FLAKY]["attempts"][0]["state"] == "failed"
    assert shards[FLAKY]["state"] == "succeeded"
    attempts = [a for s in shards.values() for a in s["attempts"]]
    assert "preempted" in [a["state"] for a in attempts], "the SIGTERMed worker records it"
    # Only the SIGTERMed worker's attempts were preempted: scaling down never stopped a busy VM.
    assert {a["worker"] for a in attempts if a["state"] == "preempted"} == {preempted}
    assert set(cloud.fake.preempted) >= {preempted, killed}  # both were recreated

    # Every good shard committed exactly once: the combined output has each index once.
    combined = cloud.run("combine", run_id, "--out", str(tmp_path / "combined"))
    assert combined.returncode == 0, combined.stderr
    lines = (tmp_path / "combined" / "index.txt").read_text().split()
    assert sorted(map(int, lines)) == [i for i in range(SHARDS) if i != POISON]

    # The group ends at zero, only ever by deleting instances by name.
    wait_for(cloud.fake.is_empty, 30, "the group at zero")
    assert cloud.fake.live() == {}
    assert not cloud.fake.resized_down()


def test_idle_workers_leave_the_group_by_themselves(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path, idle_timeout=1.0)
    task = make_task(tmp_path / "task", COPY_TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    inputs = make_inputs(tmp_path / "data", ["a.csv", "b b.csv", "c.csv"])
    result = cloud.run(
        "submit", str(task), "--inputs", str(inputs / "*.csv"), "--workers", "2", "--detach"
    )
    assert result.returncode == 0, result.stderr
    wait_for(lambda: cloud.fake.resizes, 10, "the group grown")
    # Nobody deletes them: the workers finish the run, idle out and delete their own VMs.
    wait_for(cloud.fake.is_empty, 60, "workers gone")
    run_id = result.stdout.strip()
    assert cloud.status(run_id)["counts"]["succeeded"] == 3
    assert _states(cloud, run_id) == ["succeeded"] * 3
    assert not cloud.fake.resized_down()
    logs = "".join(p.read_text() for p in (tmp_path / "vms").glob("*.log"))
    assert logs.count("left group") == 2
    # The local inputs were uploaded to the run's prefix and streamed to the workers.
    combined = cloud.run("combine", run_id, "--out", str(tmp_path / "combined"))
    assert combined.returncode == 0, combined.stderr
    rows = (tmp_path / "combined" / "rows.csv").read_text().splitlines()
    assert rows[0] == "id,value" and len(rows) == 1 + 3 * 3
    assert (
        f"gs://{deployment.bucket}/runs/{run_id}/inputs/"
        in cloud.status(run_id)["shards"][0]["input"]
    )


def test_a_quota_limited_group_still_finishes_and_the_runner_says_why(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        deployment,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
    )
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE, cpu_quota=4, cpus_per_vm=2)
    holder["endpoint"] = fake.endpoint
    cloud = Cloud(deployment, fake, tmp_path)
    task = make_task(tmp_path / "task", "import time\n\ndef run(shard):\n    time.sleep(0.2)\n")
    result = cloud.run("submit", str(task), "--shards", "12", "--workers", "4", timeout=180)
    assert result.returncode == 0, result.stderr
    assert "VMs cannot start: QUOTA_EXCEEDED: Quota 'CPUS' exceeded." in result.stderr
    run_id = result.stdout.strip().splitlines()[0]
    assert _states(cloud, run_id) == ["succeeded"] * 12  # no busy VM was deleted
    wait_for(fake.is_empty, 30, "the group at zero")


def test_a_vm_that_fails_to_boot_is_named_removed_and_replaced(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        deployment,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
    )
    store = GcsStore(deployment.bucket)
    failed: list[str] = []

    def failed_boot(name: str) -> subprocess.Popen[Any]:
        # What infra/scripts/startup.sh leaves when a step fails (tested in tests/infra).
        report_problem(store, name, "failed to boot: E: Unable to fetch some archives")
        return sleeper(name)  # the VM runs on, with no worker

    def fails(name: str) -> bool:
        if not failed:
            failed.append(name)
        return name == failed[0]

    fake = fake_compute(
        spawn=spawn, group=GROUP, zone=ZONE, boot_fails=fails, failed_spawn=failed_boot
    )
    holder["endpoint"] = fake.endpoint
    cloud = Cloud(deployment, fake, tmp_path)
    task = make_task(tmp_path / "task", "import time\n\ndef run(shard):\n    time.sleep(0.2)\n")
    result = cloud.run("submit", str(task), "--shards", "10", "--workers", "2", timeout=180)
    assert result.returncode == 0, result.stderr
    (bad,) = failed
    assert f"VM {bad} failed to boot: E: Unable to fetch some archives" in result.stderr
    run_id = result.stdout.strip().splitlines()[0]
    status = cloud.status(run_id)
    assert status["counts"]["succeeded"] == 10
    assert [a["state"] for s in status["shards"] for a in s["attempts"]] == ["succeeded"] * 10
    workers = {a["worker"] for s in status["shards"] for a in s["attempts"]}
    assert bad not in workers  # it was sent no work
    assert bad in fake.deleted
    wait_for(fake.is_empty, 30, "the group at zero")
