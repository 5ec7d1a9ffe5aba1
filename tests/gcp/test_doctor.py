"""``runner doctor`` against the emulators and the fake Compute API."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from runner.config import Backend, Config
from runner.doctor import run_checks
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env
from tests.gcp.fake_compute import sleeper

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
    }
    assert "dead letters to" in checks["work subscription"]["detail"]
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
