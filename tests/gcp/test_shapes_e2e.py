"""Shaped runs through the ``runner`` CLI on the emulators, with real workers in shaped groups.

The fake Compute API starts each VM of a shaped group as ``python -m worker --backend gcp``
configured from its template's metadata (``shaped_worker_spawner``), as the VM's startup script
would: so a worker pulls whichever subscription the shaped template names.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli, make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, shaped_worker_spawner, worker_env
from tests.gcp.fake_compute import FakeCompute, sleeper

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

GROUP = "cflow-workers"
ZONE = "us-central1-a"
REGION = "us-central1"
QUOTAS = {
    "CPUS": (64.0, 0.0),
    "PREEMPTIBLE_CPUS": (0.0, 0.0),
    "SSD_TOTAL_GB": (2048.0, 0.0),
}

TASK = """
import os, time
from pathlib import Path

def run(shard):
    if shard.index == 0 and os.environ.get("MARK_DIR"):
        marks = Path(os.environ["MARK_DIR"])
        (marks / f"{os.environ['CFLOW_WORKER_NAME']}.{shard.attempt}").touch()
        while Path(os.environ["HOLD_FILE"]).exists():  # busy until the test has preempted it
            time.sleep(0.05)
    else:
        time.sleep(0.3)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


class Cloud(Cli):
    """The runner CLI pointed at one emulated deployment (zonal or regional) and its fake."""

    def __init__(self, d: Deployment, fake: FakeCompute, workdir: Path, **where: str):
        super().__init__(workdir)
        self.fake = fake
        outputs = workdir / "cflow-outputs.json"
        outputs.write_text(json.dumps(d.outputs(group=GROUP, **where)))
        self.env = worker_env(fake.endpoint, CFLOW_BACKEND="gcp", CFLOW_DEPLOYMENT=str(outputs))


def _cloud(
    d: Deployment,
    fake_compute: MakeCompute,
    tmp_path: Path,
    *,
    region: bool = False,
    env: dict[str, str] | None = None,
) -> Cloud:
    holder: dict[str, str] = {}
    where = {"region": REGION} if region else {"zone": ZONE}
    spawn = shaped_worker_spawner(
        d,
        logs=tmp_path / "vms",
        endpoint=lambda: holder["endpoint"],
        idle_timeout=30,
        env=env,
        **where,
    )
    # The deployment's own group never gets a VM here: every run is shaped.
    fake = fake_compute(
        spawn=sleeper,
        shaped_spawn=spawn,
        group=GROUP,
        quotas=dict(QUOTAS),
        metadata={"cflow-subscription": d.work_subscription, "cflow-work-topic": d.work_topic},
        **({"zone": None, "region": REGION} if region else {"zone": ZONE}),
    )
    holder["endpoint"] = fake.endpoint
    return Cloud(d, fake, tmp_path, **where)


def _groups(stderr: str) -> list[str]:
    """The shaped groups ``submit`` said the run's VMs come from."""
    return re.findall(r"VMs from group (\S+) \(", stderr)


def _attempts(status: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    return {s["index"]: s["attempts"] for s in status["shards"]}


def test_concurrent_runs_of_two_shapes_each_run_only_on_their_own_vms(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path)
    task = make_task(tmp_path / "task", TASK)
    shards = 8
    small = cloud.start(
        "submit", str(task), "--shards", str(shards), "--workers", "2",
        "--machine-type", "n2-standard-2",
    )  # fmt: skip
    big = cloud.start(
        "submit", str(task), "--shards", str(shards), "--workers", "2",
        "--machine-type", "n2-highcpu-4", "--disk-gb", "30",
    )  # fmt: skip
    results = []
    try:
        for proc in (small, big):
            stdout, stderr = proc.communicate(timeout=180)
            assert proc.returncode == 0, stderr
            results.append((stdout.strip().splitlines()[0], _groups(stderr)))
    finally:
        for proc in (small, big):
            if proc.poll() is None:
                proc.kill()
    (small_run, [small_group]), (big_run, [big_group]) = results
    assert small_group != big_group
    templates = cloud.fake.templates
    assert templates[small_group]["properties"]["machineType"] == "n2-standard-2"
    assert templates[big_group]["properties"]["machineType"] == "n2-highcpu-4"
    for run_id, group in ((small_run, small_group), (big_run, big_group)):
        status = cloud.status(run_id)
        assert status["counts"]["succeeded"] == shards, status["counts"]
        vms = {a["worker"] for attempts in _attempts(status).values() for a in attempts}
        # Every shard ran once: neither run's scale-down stopped a VM busy with the other's.
        states = [a["state"] for attempts in _attempts(status).values() for a in attempts]
        assert states == ["succeeded"] * shards, states
        # Each run's every attempt ran on a VM of its own shape's group, never the other's.
        base = cloud.fake.made_groups[group]["baseInstanceName"]
        assert vms and all(vm.startswith(f"{base}-") for vm in vms), (group, vms)
        # Exactly once: each shard committed once, and the combined output has each index once.
        out = tmp_path / f"combined-{run_id}"
        combined = cloud("combine", run_id, "--out", str(out))
        assert combined.code == 0, combined.stderr
        lines = (out / "index.txt").read_text().split()
        assert sorted(map(int, lines)) == list(range(shards))
    # The deployment's own group and queue were never used.
    assert cloud.fake.resizes == [] and cloud.fake.is_empty()
    wait_for(lambda: cloud.fake.live() == {}, 60, "every shaped VM gone")


def test_a_regional_fallback_run_pins_a_preempted_shard_to_standard_vms(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks, hold = tmp_path / "marks", tmp_path / "hold"
    marks.mkdir()
    hold.touch()
    env = {"MARK_DIR": str(marks), "HOLD_FILE": str(hold)}
    cloud = _cloud(deployment, fake_compute, tmp_path, region=True, env=env)
    task = make_task(tmp_path / "task", TASK)
    submit = cloud.start(
        "submit", str(task), "--shards", "4", "--workers", "2",
        "--machine-type", "n2-standard-2", "--fallback", "standard", "--fallback-after", "1",
    )  # fmt: skip
    try:
        mark = wait_for(lambda: next(iter(marks.iterdir()), None), 60, "shard 0 started")
        spot_vm = mark.name.split(".")[0]  # its attempt is running: the SIGTERM preempts it
        cloud.fake.live()[spot_vm].send_signal(signal.SIGTERM)
        # Once it was given back and started again elsewhere, the next attempt runs through.
        wait_for(lambda: len(list(marks.iterdir())) > 1, 90, "shard 0 started again")
        hold.unlink()
        stdout, stderr = submit.communicate(timeout=180)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, stderr
    run_id = stdout.strip().splitlines()[0]
    spot_group, standard_group = _groups(stderr)
    # Both groups are regional, spread over the region's zones.
    for name in (spot_group, standard_group):
        record = cloud.fake.made_groups[name]
        assert record["region"].endswith(f"/regions/{REGION}")
        zones = [z["zone"] for z in record["distributionPolicy"]["zones"]]
        assert zones == [f"zones/{REGION}-{z}" for z in "bcf"]
    spot_base = cloud.fake.made_groups[spot_group]["baseInstanceName"]
    standard_base = cloud.fake.made_groups[standard_group]["baseInstanceName"]
    assert spot_vm.startswith(f"{spot_base}-")
    status = cloud.status(run_id)
    assert status["counts"]["succeeded"] == 4
    first, *rest = _attempts(status)[0]
    assert (first["state"], first["worker"]) == ("preempted", spot_vm)
    # Preempted once (K = 1): every later attempt ran on a standard VM, and one committed.
    assert rest and all(a["worker"].startswith(f"{standard_base}-") for a in rest), rest
    assert rest[-1]["state"] == "succeeded"
    # Only that attempt was preempted: scaling down never stopped a busy VM.
    others = [a["state"] for i, attempts in _attempts(status).items() if i for a in attempts]
    assert others == ["succeeded"] * 3, others
    assert "fallback to standard VMs (shard" in stderr
    wait_for(lambda: cloud.fake.live() == {}, 60, "every shaped VM gone")
