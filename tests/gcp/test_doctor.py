"""``runner doctor`` against the emulators and the fake Compute API."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import google.cloud.pubsub_v1 as pubsub_v1
import pytest

from infra.contract import REQUIRED_APIS
from runner.backends.gcp.doctor import run_checks
from runner.backends.gcp.fleet import GceFleet
from runner.backends.gcp.prerequisites import (
    check_apis,
    check_images,
    check_pubsub_agent,
    check_shapes,
)
from runner.config import Backend, Config
from tests.e2e.conftest import wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env
from tests.gcp.fake_compute import sleeper
from tests.gcp.fake_serviceusage import FakeIam, FakeServiceUsage
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.vm import report_problem
from worker.protocol import RunOptions

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
    usage = FakeServiceUsage(project=deployment.project, enabled=set(REQUIRED_APIS)).start()
    try:
        result = subprocess.run(
            [
                *(sys.executable, "-m", "runner", "doctor", "--json"),
                *("--deployment", str(outputs), "--machine-type", "n2-standard-4"),
            ],
            env=worker_env(fake.endpoint, CFLOW_SERVICE_USAGE_ENDPOINT=usage.endpoint),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        usage.stop()
    assert len(usage.requests) == 1  # one batchGet for every API
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
        "APIs",
        "Pub/Sub service agent",
        "GPU image",
        "machine shape",
    }
    assert checks["machine shape"]["detail"] == f"a VM of n2-standard-4, Spot fits, in {ZONE}"
    assert checks["APIs"]["detail"].startswith(f"{len(REQUIRED_APIS)} enabled: compute, pubsub")
    # The emulator has no IAM: said so, not passed off as checked.
    assert checks["Pub/Sub service agent"]["detail"].startswith("not checkable here")
    assert checks["GPU image"]["detail"].endswith("boot disks of 50 GB or more")
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


@pytest.fixture
def usage(deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServiceUsage]:
    fake = FakeServiceUsage(project=deployment.project, enabled=set(REQUIRED_APIS)).start()
    monkeypatch.setenv("CFLOW_SERVICE_USAGE_ENDPOINT", fake.endpoint)
    yield fake
    fake.stop()


def test_apis_not_enabled_are_named_with_the_command_that_enables_them(
    deployment: Deployment, usage: FakeServiceUsage
) -> None:
    config = _config(deployment)
    assert check_apis(config).ok
    usage.enabled -= {"artifactregistry.googleapis.com", "logging.googleapis.com"}
    off = check_apis(config)
    assert not off.ok
    assert off.detail == (
        "not enabled in cflow-test: logging.googleapis.com, artifactregistry.googleapis.com; "
        "run `gcloud services enable logging.googleapis.com artifactregistry.googleapis.com "
        "--project cflow-test`"
    )
    usage.disabled_api = True  # Service Usage itself off: the answer says so, in one line
    refused = check_apis(config)
    assert not refused.ok and refused.detail.startswith("could not read the project's enabled")
    assert "serviceusage.googleapis.com" in refused.detail and "\n" not in refused.detail
    # Every name asked for is the project's, at most the API's limit per request.
    assert all(r.count("names=") <= 30 for r in usage.requests)


def test_the_gpu_image_is_resolved_and_a_missing_family_named_with_the_fix(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(spawn=sleeper)
    (found,) = check_images(_config(deployment))
    assert found.ok and "50 GB" in found.detail
    gone = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-12"
    (missing,) = check_images(dataclasses.replace(_config(deployment), gpu_image=gone))
    assert not missing.ok
    assert missing.detail.startswith(f"boot image {gone} does not exist: set the deployment's")


def test_the_shape_asked_for_is_checked_against_its_series_quota(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(
        spawn=sleeper,
        quotas={"CPUS": (64.0, 0.0), "N2_CPUS": (4.0, 0.0), "SSD_TOTAL_GB": (2048.0, 0.0)},
    )
    config = _config(deployment)
    (short,) = check_shapes(config, RunOptions(machine_type="n2-standard-8"))
    assert not short.ok and "needs 8 N2_CPUS, the project has 4 free" in short.detail
    (fits,) = check_shapes(config, RunOptions(machine_type="n1-standard-8", disk_gb=30))
    assert fits.ok and fits.detail == f"a VM of n1-standard-8, Spot, 30 GB disk fits, in {ZONE}"
    checks = run_checks(config, options=RunOptions(gpu="nvidia-l4:3"))
    assert [c.detail for c in checks if c.name == "machine shape"] == [
        "--gpu 'nvidia-l4:3': give TYPE[:COUNT], COUNT 1, 2, 4 or 8"
    ]


def test_the_pubsub_service_agents_grants_are_read(deployment: Deployment) -> None:
    project = deployment.project
    work = f"projects/{project}/subscriptions/{deployment.work_subscription}"
    dead = f"projects/{project}/topics/{deployment.dead_letter_topic}"
    agent = "serviceAccount:service-123456789012@gcp-sa-pubsub.iam.gserviceaccount.com"
    iam = FakeIam(
        {
            dead: {"roles/pubsub.publisher": [agent]},
            work: {"roles/pubsub.subscriber": ["serviceAccount:worker@p.iam"]},
        }
    ).start()
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    clients = iam.clients()
    config = _config(deployment)
    try:
        short = check_pubsub_agent(config, publisher=publisher, subscriber=subscriber, iam=clients)
        assert not short.ok and f"lacks roles/pubsub.subscriber on {work}" in short.detail
        assert sorted(iam.asked) == sorted([dead, work])
        iam.policies[work]["roles/pubsub.subscriber"].append(agent)
        granted = check_pubsub_agent(
            config, publisher=publisher, subscriber=subscriber, iam=clients
        )
        assert granted.ok, granted.detail
        # The emulator has no IAM at all: said so, not passed off as checked.
        emulator = check_pubsub_agent(config, publisher=publisher, subscriber=subscriber)
        assert emulator.ok and emulator.detail.startswith("not checkable here")
    finally:
        for client in (*clients, subscriber):
            client.transport.close()
        publisher.stop()
        iam.stop()


def test_a_group_of_a_series_with_its_own_cpu_quota_is_counted_against_it(
    deployment: Deployment, fake_compute: MakeCompute
) -> None:
    fake_compute(
        spawn=sleeper,
        machine_type="n2-standard-4",
        quotas={"CPUS": (0.0, 0.0), "N2_CPUS": (40.0, 0.0), "SSD_TOTAL_GB": (10000.0, 0.0)},
    )
    quota = {c.name: c for c in run_checks(_config(deployment))}["quota"]
    assert quota.detail.startswith(
        "10 Spot n2-standard-4 VMs fit in us-central1 (N2_CPUS binds); for 125 VMs ask for "
        "N2_CPUS 500"
    )
