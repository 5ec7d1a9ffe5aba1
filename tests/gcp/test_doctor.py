"""``runner doctor`` against the emulators and the fake Compute API."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.backends.gcp.doctor import run_checks
from runner.backends.gcp.fleet import GceFleet
from runner.config import Backend, Config
from tests.e2e.conftest import wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env
from tests.gcp.fake_compute import sleeper
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.vm import report_problem

pytestmark = pytest.mark.emulator

ZONE = "us-central1-a"


def _config(d: Deployment, **changes: str) -> Config:
    fields = d.outputs(**{"zone": ZONE, "group": "cflow-workers", **changes})
    return Config(backend=Backend.GCP, **fields)


def test_complete_deployment_passes_through_the_cli(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    fake = fake_compute(spawn=sleeper)
    outputs = tmp_path / "cflow-outputs.json"
    outputs.write_text(json.dumps(deployment.outputs(zone=ZONE, group="cflow-workers")))
    result = subprocess.run(
        [sys.executable, "-m", "runner", "doctor", "--json", "--deployment", str(outputs)],
        env=worker_env(fake.endpoint),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)}
    assert all(c["ok"] for c in checks.values()), checks
    assert set(checks) == {
        "credentials",
        "bucket",
        "work topic",
        "events topic",
        "work subscription",
        "events subscription",
        "dead-letter subscription",
        "instance group",
        "quota",
        "VMs",
    }
    assert "dead letters to" in checks["work subscription"]["detail"]
    # 24 CPUs and 500 GB of SSD quota, e2-standard-2 with 20 GB disks: 12 VMs.
    assert checks["quota"]["detail"].startswith(
        "12 Spot e2-standard-2 VMs fit in us-central1 (CPUS binds); for 125 VMs ask for CPUS 250, "
        "SSD_TOTAL_GB 2500; for 2000 VMs ask for CPUS 4000, SSD_TOTAL_GB 40000"
    )
    assert "the deployment is ready" in result.stderr


def test_missing_resources_are_named_with_the_fix(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(spawn=sleeper)
    config = _config(
        deployment,
        bucket="no-such-bucket",
        events_topic="no-such-topic",
        dead_letter_subscription="no-such-sub",
        group="no-such-group",
    )
    failed = {c.name: c.detail for c in run_checks(config) if not c.ok}
    assert set(failed) == {
        "bucket",
        "events topic",
        "events subscription",  # still on the real events topic, not the one named
        "dead-letter subscription",
        "instance group",
    }
    assert "gs://no-such-bucket does not exist" in failed["bucket"]
    assert "projects/cflow-test/topics/no-such-topic does not exist" in failed["events topic"]
    assert "is attached to" in failed["events subscription"]
    assert "no-such-sub does not exist" in failed["dead-letter subscription"]
    assert "no-such-group" in failed["instance group"]
    assert all("cdktf deploy" in detail for name, detail in failed.items() if name != "bucket")


def test_subscription_on_the_wrong_topic_is_reported(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(spawn=sleeper)
    config = dataclasses.replace(
        _config(deployment), events_subscription=deployment.work_subscription
    )
    failed = {c.name: c.detail for c in run_checks(config) if not c.ok}
    assert list(failed) == ["events subscription"]
    assert (
        f"attached to projects/cflow-test/topics/{deployment.work_topic}"
        in failed["events subscription"]
    )


def test_quota_short_of_the_group_says_what_to_ask_for(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(spawn=sleeper, cpu_quota=8)  # a fresh project's Spot allowance, say
    checks = {c.name: c for c in run_checks(_config(deployment))}
    quota = checks["quota"]
    assert not quota.ok
    assert quota.detail.startswith("only 4 Spot e2-standard-2 VMs fit in us-central1 (CPUS binds)")
    assert "for 125 VMs ask for CPUS 250, SSD_TOTAL_GB 2500" in quota.detail


def test_spot_vms_count_against_preemptible_cpus_when_the_project_has_them(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(
        spawn=sleeper,
        quotas={
            "CPUS": (8.0, 0.0),
            "PREEMPTIBLE_CPUS": (400.0, 100.0),
            "SSD_TOTAL_GB": (10000.0, 0.0),
            "IN_USE_ADDRESSES": (8.0, 0.0),
        },
    )
    quota = {c.name: c for c in run_checks(_config(deployment))}["quota"]
    assert quota.ok, quota.detail
    assert quota.detail.startswith(
        "150 Spot e2-standard-2 VMs fit in us-central1 (PREEMPTIBLE_CPUS binds); "
        "for 2000 VMs ask for PREEMPTIBLE_CPUS 4100"
    )


def test_vms_that_reported_a_problem_are_named(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake = fake_compute(spawn=sleeper)
    fleet = GceFleet(project=deployment.project, group="cflow-workers", zone=ZONE)
    (name,) = fleet.grow(1)
    wait_for(lambda: len(fake.live()) == 1, 10, "the VM")
    store = GcsStore(deployment.bucket)
    report_problem(store, name, "could not remove itself from its group")
    vms = {c.name: c for c in run_checks(_config(deployment))}["VMs"]
    assert not vms.ok
    assert vms.detail.startswith(f"VM {name} could not remove itself from its group; ")
    assert "runner watch" in vms.detail
    fleet.delete([name])
    assert fleet.wait_empty(10)
