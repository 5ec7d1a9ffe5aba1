"""Machine shapes against the fake Compute API: checked before anything is made, then a template
derived from the deployment's and a group of its own, reused by content."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.shapes import Shape, ShapeError, Shapes, derive_properties, gpu_quota_metric
from tests.e2e.conftest import wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env
from tests.gcp.fake_compute import FakeCompute, sleeper
from worker.gcs_store import GcsStore, make_client

ZONE = "us-central1-a"
GROUP = "cflow-workers"
PROJECT_QUOTAS = {
    "CPUS": (64.0, 0.0),
    "PREEMPTIBLE_CPUS": (0.0, 0.0),
    "NVIDIA_L4_GPUS": (0.0, 0.0),
    "PREEMPTIBLE_NVIDIA_L4_GPUS": (4.0, 0.0),
    "NVIDIA_T4_GPUS": (1.0, 1.0),
    "SSD_TOTAL_GB": (2048.0, 0.0),
}


@pytest.fixture
def fake(fake_compute: MakeCompute) -> FakeCompute:
    return fake_compute(spawn=sleeper, quotas=dict(PROJECT_QUOTAS))


@pytest.fixture
def shapes(fake: FakeCompute) -> Iterator[Shapes]:
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    yield s
    s.close()


def _posts(fake: FakeCompute) -> list[str]:
    return [path for method, path in fake.requests if method == "POST"]


def test_a_gpu_shape_gets_its_own_template_and_group(fake: FakeCompute, shapes: Shapes) -> None:
    shape = Shape.parse(machine_type="n1-standard-8", gpu="nvidia-l4:1", disk_gb=200)
    made = shapes.ensure(shape)
    assert made.created and made.group.startswith(f"{GROUP}-") and made.group != GROUP
    props = fake.templates[made.template]["properties"]
    assert props["machineType"] == "n1-standard-8"
    assert props["guestAccelerators"] == [{"acceleratorType": "nvidia-l4", "acceleratorCount": 1}]
    assert props["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert props["scheduling"]["provisioningModel"] == "SPOT"
    (boot,) = [d for d in props["disks"] if d["boot"]]
    assert boot["initializeParams"]["diskSizeGb"] == "200"
    items = {i["key"]: i["value"] for i in props["metadata"]["items"]}
    assert items["cflow-group"] == made.group  # its workers leave their own group
    group = fake.made_groups[made.group]
    assert group["instanceTemplate"].endswith(f"/instanceTemplates/{made.template}")
    assert group["targetSize"] == 0
    assert group["baseInstanceName"].startswith(f"{GROUP}-")
    # The deployment's group and its VMs are untouched: never resized, never re-pointed.
    assert fake.resizes == [] and fake.group.target_size == 0
    assert not [p for p in _posts(fake) if f"/instanceGroupManagers/{GROUP}/" in p]


def test_the_same_shape_is_reused_and_another_is_new(fake: FakeCompute, shapes: Shapes) -> None:
    shape = Shape.parse(machine_type="n2-highmem-8", disk_gb=100)
    first = shapes.ensure(shape)
    posts = len(_posts(fake))
    again = shapes.ensure(Shape.parse(machine_type="n2-highmem-8", disk_gb=100))
    assert again.group == first.group and not again.created
    assert len(_posts(fake)) == posts  # nothing inserted the second time
    other = shapes.ensure(shape.standard())
    assert other.group != first.group
    scheduling = fake.templates[other.template]["properties"]["scheduling"]
    assert scheduling["provisioningModel"] == "STANDARD"
    assert scheduling["onHostMaintenance"] == "MIGRATE" and scheduling["automaticRestart"] is True
    assert "instanceTerminationAction" not in scheduling
    assert len(fake.made_groups) == 2


def open_dep(deployment: Deployment, **fields: str) -> Any:
    """The runner's deployment on the emulators, its group in the fake (zonal unless told)."""
    from runner.config import Backend, Config
    from runner.gcp import open_gcp_deployment

    where = fields or {"zone": ZONE}
    return open_gcp_deployment(
        Config(backend=Backend.GCP, group=GROUP, **deployment.outputs(), **where)
    )


@pytest.mark.emulator
def test_fallback_is_refused_without_standard_gpu_quota(
    fake: FakeCompute, deployment: Deployment
) -> None:
    from runner.run_shape import apply_run_shape
    from worker.protocol import RunOptions

    dep = open_dep(deployment)
    before = dep.make_fleet
    options = RunOptions(machine_type="n1-standard-4", gpu="nvidia-l4:1", fallback="standard")
    try:
        with pytest.raises(ShapeError, match=r"standard n1-standard-4 VM.*NVIDIA_L4_GPUS"):
            apply_run_shape(dep, options)
        assert dep.make_fleet is before  # the deployment's fleet is left as it was
    finally:
        dep.close()


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        (Shape.parse(machine_type="n2-gigantic-7"), "machine type n2-gigantic-7 does not exist"),
        (Shape.parse(machine_type="n1-standard-4", gpu="nvidia-h200:1"), "not offered in zone"),
        (Shape.parse(machine_type="n2-highmem-8", gpu="nvidia-l4:1"), "GPUs attach only to n1"),
        (Shape.parse(machine_type="g2-standard-4", gpu="nvidia-l4:2"), "comes with nvidia-l4:1"),
        (Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:8"), "PREEMPTIBLE_NVIDIA_L4"),
        (
            Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:1", provisioning="standard"),
            "needs 1 NVIDIA_L4_GPUS, the project has 0 free",
        ),
        (Shape.parse(machine_type="n1-standard-96"), "needs 96 CPUS"),
        (Shape.parse(disk_gb=4000), "needs 4000 SSD_TOTAL_GB, the project has 2048 free"),
    ],
)
def test_shapes_that_cannot_run_are_refused_before_anything_is_made(
    fake: FakeCompute, shapes: Shapes, shape: Shape, says: str
) -> None:
    with pytest.raises(ShapeError, match=says) as refused:
        shapes.ensure(shape)
    assert "\n" not in str(refused.value)
    assert fake.templates == {} and fake.made_groups == {}
    assert _posts(fake) == []


def test_an_accelerator_optimized_type_brings_its_gpus(fake: FakeCompute, shapes: Shapes) -> None:
    made = shapes.ensure(Shape.parse(machine_type="g2-standard-24"))
    props = fake.templates[made.template]["properties"]
    assert "guestAccelerators" not in props  # g2 comes with 2 L4s
    assert props["scheduling"]["onHostMaintenance"] == "TERMINATE"


def test_the_fake_refuses_templates_the_way_the_api_does(fake: FakeCompute) -> None:
    base = {"machineType": "n1-standard-4", "scheduling": {"onHostMaintenance": "MIGRATE"}}
    gpu = {
        **base,
        "guestAccelerators": [{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}],
    }
    code, body = fake._insert_template({"name": "t-gpu", "properties": gpu})
    assert (code, body["error"]["errors"][0]["reason"]) == (400, "badRequest")
    assert "do not support live migration" in body["error"]["message"]
    code, _ = fake._insert_template(
        {"name": "t-g2", "properties": {**base, "machineType": "g2-standard-4"}}
    )
    assert code == 400
    e2 = {**gpu, "machineType": "e2-standard-4", "scheduling": {"onHostMaintenance": "TERMINATE"}}
    code, body = fake._insert_template({"name": "t-e2", "properties": e2})
    assert code == 400 and "does not support accelerators" in body["error"]["message"]
    code, _ = fake._insert_template({"name": "Bad_Name", "properties": base})
    assert code == 400
    assert fake._insert_template({"name": "t-ok", "properties": base})[0] == 200
    code, body = fake._insert_template({"name": "t-ok", "properties": base})
    assert (code, body["error"]["errors"][0]["reason"]) == (409, "alreadyExists")


def test_derived_scheduling_never_asks_live_migration_of_a_gpu() -> None:
    props = derive_properties(
        {"machineType": "n1-standard-4", "scheduling": {"onHostMaintenance": "MIGRATE"}},
        Shape.parse(gpu="nvidia-tesla-t4:2", provisioning="standard"),
        spot=False,
    )
    assert props["scheduling"]["onHostMaintenance"] == "TERMINATE"
    assert props["guestAccelerators"][0]["acceleratorCount"] == 2


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"gpu": "nvidia-l4:3"}, "COUNT 1, 2, 4 or 8"),
        ({"gpu": "L4"}, "TYPE"),
        ({"provisioning": "preemptible"}, "spot or standard"),
        ({"disk_gb": 5}, "--disk-gb 5"),
        ({"machine_type": "N2 big"}, "not a machine type name"),
    ],
)
def test_bad_shape_options_are_one_line(kwargs: dict[str, object], says: str) -> None:
    with pytest.raises(ShapeError, match=says):
        Shape.parse(**kwargs)  # type: ignore[arg-type]


def test_gpu_quota_metrics_follow_compute_engine_names() -> None:
    assert gpu_quota_metric("nvidia-l4", spot=False) == "NVIDIA_L4_GPUS"
    assert gpu_quota_metric("nvidia-tesla-t4", spot=True) == "PREEMPTIBLE_NVIDIA_T4_GPUS"
    assert gpu_quota_metric("nvidia-a100-80gb", spot=False) == "NVIDIA_A100_80GB_GPUS"
    assert gpu_quota_metric("nvidia-h100-80gb", spot=True) == "PREEMPTIBLE_NVIDIA_H100_GPUS"


def _submit(deployment: Deployment, fake: FakeCompute, tmp: Path, *args: str) -> Any:
    task = tmp / "task"
    task.mkdir(exist_ok=True)
    (task / "task.py").write_text("def run(shard):\n    return None\n")
    outputs = tmp / "cflow-outputs.json"
    outputs.write_text(json.dumps(deployment.outputs(zone=ZONE, group=GROUP)))
    return subprocess.run(
        [
            *(sys.executable, "-m", "runner", "submit", str(task), "--shards", "3"),
            *("--no-check", "--detach", "--deployment", str(outputs), *args),
        ],
        env=worker_env(fake.endpoint),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.emulator
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("--machine-type", "n2-gigantic-7"), "machine type n2-gigantic-7 does not exist"),
        (("--gpu", "nvidia-l4:1", "--machine-type", "n2-highmem-8"), "GPUs attach only to n1"),
        (("--gpu", "nvidia-l4:3"), "COUNT 1, 2, 4 or 8"),
        (("--fallback", "cheaper"), "--fallback must be standard"),
        (("--fallback", "standard", "--provisioning", "standard"), "needs Spot VMs first"),
    ],
)
def test_submit_refuses_a_bad_shape_in_one_line_and_publishes_nothing(
    deployment: Deployment,
    fake: FakeCompute,
    tmp_path: Path,
    args: tuple[str, ...],
    says: str,
) -> None:
    result = _submit(deployment, fake, tmp_path, *args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert says in last, result.stderr
    assert result.stdout == ""  # no run id: no run was made
    store = GcsStore(deployment.bucket, client=make_client(deployment.project))
    assert list(store.list("runs/")) == []
    assert fake.templates == {} and fake.made_groups == {} and fake.resizes == []


@pytest.mark.emulator
def test_a_run_with_a_shape_and_fallback_scales_its_own_groups(
    fake_compute: MakeCompute, deployment: Deployment
) -> None:
    # Fallback needs both: Spot (preemptible) and standard T4 quota.
    quotas = {**PROJECT_QUOTAS, "NVIDIA_T4_GPUS": (4.0, 0.0)}
    fake = fake_compute(spawn=sleeper, quotas=quotas)
    from runner.fallback import FallbackFleet, PreemptionTap
    from runner.gce_fleet import GceFleet
    from runner.run_shape import apply_run_shape
    from runner.shape_queues import ShapeWorkQueue
    from worker.protocol import Event, RunOptions
    from worker.pubsub_queue import PubSubEvents

    dep = open_dep(deployment)
    options = RunOptions(machine_type="n1-standard-4", gpu="nvidia-tesla-t4:1", fallback="standard")
    try:
        spot, standard = apply_run_shape(dep, options)
        assert spot.group != standard.group and GROUP not in (spot.group,)
        assert len(fake.made_groups) == 2
        spot_props = fake.templates[spot.template]["properties"]
        assert spot_props["scheduling"]["provisioningModel"] == "SPOT"
        scheduling = fake.templates[standard.template]["properties"]["scheduling"]
        assert scheduling["provisioningModel"] == "STANDARD"
        # Each shape pulls its own subscription; the run's shards go to the Spot shape's topic,
        # each naming the standard shape's topic for after K preemptions.
        assert spot.queue is not None and standard.queue is not None
        items = {i["key"]: i["value"] for i in spot_props["metadata"]["items"]}
        assert items["cflow-subscription"] == spot.queue.subscription
        assert items["cflow-work-topic"] == spot.queue.topic
        queue = dep.backends.queue
        assert isinstance(queue, ShapeWorkQueue)
        assert queue.topic == f"projects/{deployment.project}/topics/{spot.queue.topic}"
        assert (queue.fallback_topic, queue.fallback_after) == (standard.queue.topic, 3)
        fleet = dep.make_fleet(1, None)
        assert isinstance(fleet, FallbackFleet)
        assert isinstance(fleet.spot, GceFleet) and fleet.spot.group == spot.group
        assert isinstance(fleet.standard, GceFleet) and fleet.standard.group == standard.group
        events = dep.open_run_events("r", None)
        assert isinstance(events, PreemptionTap)
        worker_events = PubSubEvents(project=deployment.project, topic=deployment.events_topic)
        worker_events.publish(Event("preempted", "vm-1", run_id="r", shard_id="s1"))
        worker_events.close()
        wait_for(lambda: events.pull(timeout=0.5) and fleet.preemptions, 20, "the event")
        assert fleet.preemptions == {"s1": 1}  # the watcher's events feed the fallback's count
        events.close()
    finally:
        dep.close()
    # Shape alone, no fallback: one group, a plain GceFleet on it.
    alone = open_dep(deployment)
    try:
        (only,) = apply_run_shape(
            alone, RunOptions(machine_type="n1-standard-4", gpu="nvidia-tesla-t4:1")
        )
        assert only.group == spot.group and not only.created  # reused by content
        plain = alone.make_fleet(1, None)
        assert isinstance(plain, GceFleet) and plain.group == spot.group
        assert alone.backends.queue.fallback_topic is None
    finally:
        alone.close()
