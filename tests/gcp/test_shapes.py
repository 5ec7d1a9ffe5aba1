"""Machine shapes against the fake Compute API: checked before anything is made, then a template
derived from the deployment's and a group of its own, reused by content."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.backends.gcp.quota import gpu_quota_metric
from runner.backends.gcp.shapes.groups import Shapes, derive_properties
from runner.backends.gcp.shapes.model import Shape, ShapeError
from tests.e2e.conftest import wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env
from tests.gcp.fake_compute import FakeCompute, sleeper
from tests.gcp.fake_images import Image
from worker.backends.gcp.gcs import GcsStore, make_client

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
    return [path.split("?")[0] for method, path in fake.requests if method == "POST"]


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
    # A VM that powered itself off stays off: the deployment group's failure policy.
    assert group["instanceLifecyclePolicy"]["defaultActionOnFailure"] == "DO_NOTHING"
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
    from runner.backends.gcp.deployment import open_gcp_deployment
    from runner.config import Backend, Config

    where = fields or {"zone": ZONE}
    return open_gcp_deployment(
        Config(backend=Backend.GCP, group=GROUP, **deployment.outputs(), **where)
    )


@pytest.mark.emulator
def test_fallback_is_refused_without_standard_gpu_quota(
    fake: FakeCompute, deployment: Deployment
) -> None:
    from runner.backends.gcp.shapes.apply import apply_run_shape
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
        (("--image", "us-docker.pkg.dev/p/r/ml:1"), "deploy with container_image set"),
    ],
)
def test_submit_refuses_a_bad_shape_in_one_line_and_publishes_nothing(
    deployment: Deployment,
    fake: FakeCompute,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    says: str,
) -> None:
    # The CLI's entry in this process, which has loaded the Compute client already: a runner
    # process of its own would spend seconds loading it to refuse in one line. The fixtures
    # point this process at the emulators and the fake (CFLOW_COMPUTE_ENDPOINT).
    from runner.cli.main import _main

    for name in ("CFLOW_STORE", "CFLOW_DEPLOYMENT", "CFLOW_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    return None\n")
    outputs = tmp_path / "cflow-outputs.json"
    outputs.write_text(json.dumps(deployment.outputs(zone=ZONE, group=GROUP)))
    argv = ["submit", str(task), "--shards", "3", "--no-check", "--detach"]
    with pytest.raises(SystemExit) as exited:
        _main([*argv, "--deployment", str(outputs), *args])
    stdout, stderr = capsys.readouterr()
    assert exited.value.code == 2, stderr
    last = stderr.strip().splitlines()[-1]
    assert says in last, stderr
    assert stdout == ""  # no run id: no run was made
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
    from runner.backends.gcp.fleet import GceFleet
    from runner.backends.gcp.shapes.apply import apply_run_shape
    from runner.backends.gcp.shapes.fallback import FallbackFleet, PreemptionTap
    from runner.backends.gcp.shapes.queues import ShapeWorkQueue
    from worker.backends.gcp.pubsub_events import PubSubEvents
    from worker.protocol import Event, RunOptions

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


def test_a_gpu_shape_boots_an_image_with_the_nvidia_driver(fake: FakeCompute) -> None:
    from runner.backends.gcp.shapes.groups import DEFAULT_GPU_IMAGE

    def boot(template: str) -> dict[str, Any]:
        disks = fake.templates[template]["properties"]["disks"]
        found: dict[str, Any] = next(d for d in disks if d["boot"])["initializeParams"]
        return found

    def items(template: str) -> dict[str, str]:
        listed = fake.templates[template]["properties"]["metadata"]["items"]
        return {i["key"]: i["value"] for i in listed}

    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    try:
        gpu = s.ensure(Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:1"))
        g2 = s.ensure(Shape.parse(machine_type="g2-standard-8"))  # its GPU comes with it
        cpu = s.ensure(Shape.parse(machine_type="n2-standard-4"))
    finally:
        s.close()

    def shielded(template: str) -> dict[str, bool]:
        found: dict[str, bool] = fake.templates[template]["properties"]["shieldedInstanceConfig"]
        return found

    for made in (gpu, g2):
        assert boot(made.template)["sourceImage"] == DEFAULT_GPU_IMAGE
        assert "deeplearning-platform-release" in DEFAULT_GPU_IMAGE
        assert items(made.template)["install-nvidia-driver"] == "True"
        # The driver built at boot is unsigned: Secure Boot would refuse to load it.
        assert shielded(made.template) == {
            "enableSecureBoot": False,
            "enableVtpm": True,
            "enableIntegrityMonitoring": True,
        }
    assert boot(cpu.template)["sourceImage"].endswith("/global/images/cflow-1")  # the stack's
    assert "install-nvidia-driver" not in items(cpu.template)
    assert shielded(cpu.template)["enableSecureBoot"] is True
    own = "projects/my-project/global/images/family/my-cuda"
    fake.images.add(Image("my-project", "my-cuda-2", "my-cuda", 30))
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE, gpu_image=own)
    try:  # the deployment's gpu_image setting: another image, so another template
        mine = s.ensure(Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:1"))
    finally:
        s.close()
    assert boot(mine.template)["sourceImage"] == own


def test_an_image_run_boots_the_deployments_container_image(fake: FakeCompute) -> None:
    """The stack's Debian has no container engine: an --image run's VMs boot the deployment's
    container_image (a GPU one boots the GPU image, which must carry an engine too)."""
    own = "projects/my-project/global/images/family/debian-12-podman"
    fake.images.add(Image("my-project", "debian-12-podman-1", "debian-12-podman", 10))
    engine = Shape.parse(engine=True)
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    try:
        with pytest.raises(ShapeError, match="deploy with container_image set"):
            s.ensure(engine)
    finally:
        s.close()
    assert fake.templates == {}  # refused before anything was made
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE, container_image=own)
    try:
        made = s.ensure(engine)
        plain = s.ensure(Shape.parse(machine_type="n2-standard-4"))
        both = s.ensure(Shape.parse(machine_type="n2-standard-4", engine=True))
    finally:
        s.close()
    disks = {
        m.template: next(d for d in fake.templates[m.template]["properties"]["disks"] if d["boot"])
        for m in (made, plain, both)
    }
    assert disks[made.template]["initializeParams"]["sourceImage"] == own
    assert disks[both.template]["initializeParams"]["sourceImage"] == own
    assert disks[plain.template]["initializeParams"]["sourceImage"].endswith("/images/cflow-1")
    assert len({made.group, plain.group, both.group}) == 3


def test_a_gpu_shape_needs_the_project_wide_gpu_quota_too(fake_compute: MakeCompute) -> None:
    fake = fake_compute(
        spawn=sleeper, quotas=dict(PROJECT_QUOTAS), project_quotas={"GPUS_ALL_REGIONS": (4.0, 4.0)}
    )
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    try:
        with pytest.raises(ShapeError) as refused:
            s.ensure(Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:2"))
        assert str(refused.value) == (
            "not one Spot n1-standard-4 VM fits in project cflow-test: it needs 2 "
            "GPUS_ALL_REGIONS, the project has 0 free (limit 4); ask for GPUS_ALL_REGIONS 6 "
            "(global) on the console's Quotas page"
        )
        assert fake.templates == {} and fake.made_groups == {}
        s.ensure(Shape.parse(machine_type="n2-standard-4"))  # no GPU: that quota does not apply
    finally:
        s.close()
    assert any(path == f"/compute/v1/projects/{fake.group.project}" for _, path in fake.requests)


def test_a_regional_deployment_gets_regional_groups_in_the_zones_that_offer_the_shape(
    fake_compute: MakeCompute,
) -> None:
    region = "us-central1"
    fake = fake_compute(
        spawn=sleeper,
        zone=None,
        region=region,
        quotas=dict(PROJECT_QUOTAS, NVIDIA_T4_GPUS=(4.0, 0.0)),
        zone_accelerators={f"{region}-c": frozenset({"nvidia-tesla-t4"})},
        accelerators=frozenset(),
    )
    s = Shapes(project=fake.group.project, group=GROUP, region=region)
    try:
        made = s.ensure(Shape.parse(machine_type="n1-standard-4", gpu="nvidia-tesla-t4:1"))
        with pytest.raises(ShapeError, match=r"nvidia-l4 is not offered in zone us-central1-b"):
            s.ensure(Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:1"))
        cpu = s.ensure(Shape.parse(machine_type="n2-standard-8"))
    finally:
        s.close()
    group = fake.made_groups[made.group]
    assert group["region"].endswith(f"/regions/{region}") and "zone" not in group
    assert group["distributionPolicy"]["zones"] == [{"zone": f"zones/{region}-c"}]
    zones = fake.made_groups[cpu.group]["distributionPolicy"]["zones"]
    assert zones == [{"zone": f"zones/{region}-{z}"} for z in "bcf"]
    posts = _posts(fake)
    assert f"/compute/v1/projects/cflow-test/regions/{region}/instanceGroupManagers" in posts
    # Its VMs are made like the deployment's, in its zones; the runner's fleet scales it.
    from runner.backends.gcp.fleet import GceFleet

    fleet = GceFleet(project=fake.group.project, group=made.group, region=region)
    try:
        (name,) = fleet.grow(1)
        assert name.startswith(f"{GROUP}-{made.digest}-")
        assert fake.groups[made.group].vms[name].zone == f"{region}-c"
    finally:
        fleet.close()
    # Cleanup works on regional groups too: the empty one goes, the one with a VM stays.
    from runner.backends.gcp.shapes.cleanup import cleanup_shapes

    s = Shapes(project=fake.group.project, group=GROUP, region=region)
    try:
        done = cleanup_shapes(s, [], now=time.time() + 3600)
    finally:
        s.close()
    assert done.deleted == [cpu.group] and list(done.kept) == [made.group]
    assert fake.deleted_groups == [cpu.group] and fake.deleted_templates == [cpu.template]
    # The fake refuses what the API refuses: a zone outside the group's region.
    code, body = fake._insert_group(
        "regions",
        region,
        {
            "name": "stray",
            "instanceTemplate": made.template,
            "distributionPolicy": {"zones": [{"zone": "zones/europe-west4-a"}]},
        },
    )
    assert code == 400 and "europe-west4-a" in body["error"]["message"]


@pytest.mark.emulator
def test_cleanup_removes_only_unused_empty_shapes_group_first(
    fake: FakeCompute, deployment: Deployment
) -> None:
    from datetime import UTC, datetime, timedelta

    from runner.backends.gcp.shapes.apply import open_shapes
    from runner.backends.gcp.shapes.cleanup import cleanup_shapes
    from worker.protocol import Manifest, RunState

    dep = open_dep(deployment)
    shapes = open_shapes(dep)
    assert shapes.queues is not None
    fake.now = lambda: datetime.now(UTC) - timedelta(hours=1)  # made an hour ago
    try:
        used = shapes.ensure(Shape.parse(machine_type="n2-standard-4"))
        unused = shapes.ensure(Shape.parse(machine_type="n2-standard-8"))
        busy = shapes.ensure(Shape.parse(machine_type="n2-highmem-8"))
        fake.now = lambda: datetime.now(UTC)
        young = shapes.ensure(Shape.parse(machine_type="n2-highcpu-8"))
        from runner.backends.gcp.fleet import GceFleet

        fleet = GceFleet(project=deployment.project, group=busy.group, zone=ZONE)
        fleet.grow(1)  # a VM that may be working
        fleet.close()
        active = Manifest("r-active", "b", "python", 1, {"machine_type": "n2-standard-4"})
        ended = Manifest(
            "r-ended", "b", "python", 1, {"machine_type": "n2-standard-8"}, RunState.FINISHED.value
        )
        # The API refuses to delete a template a group still uses: the group must go first.
        code, body = fake._delete_template(unused.template)
        assert (code, body["error"]["errors"][0]["reason"]) == (
            400,
            "resourceInUseByAnotherResource",
        )
        dry = cleanup_shapes(shapes, [active, ended], dry=True)
        assert dry.deleted == [unused.group] and unused.group in fake.groups
        done = cleanup_shapes(shapes, [active, ended])
        assert done.deleted == [unused.group]
        assert done.kept == {
            used.group: "run r-active uses it",
            busy.group: "1 VMs still in it (idle ones leave by themselves)",
            young.group: "made less than 10 minutes ago (its run may be starting)",
        }
        assert fake.deleted_groups == [unused.group]
        assert fake.deleted_templates == [unused.template]
        assert not shapes.queues.exists(unused.digest) and shapes.queues.exists(used.digest)
        assert GROUP in fake.groups  # the deployment's own group is never touched
        # A fallback run keeps both its Spot and its standard group.
        fb = Manifest(
            "r-fb", "b", "python", 1, {"machine_type": "n2-highcpu-8", "fallback": "standard"}
        )
        standard = shapes.ensure(Shape.parse(machine_type="n2-highcpu-8").standard())
        again = cleanup_shapes(shapes, [fb], now=time.time() + 3600)
        assert {young.group, standard.group} <= set(again.kept)
    finally:
        shapes.close()
        dep.close()


@pytest.mark.emulator
def test_a_shaped_runs_shards_and_its_retried_ones_go_to_its_shapes_queue(
    deployment: Deployment, fake: FakeCompute, tmp_path: Path
) -> None:
    from worker.backends.gcp.pubsub import PubSubQueue

    result = _submit(deployment, fake, tmp_path, "--machine-type", "n2-standard-4")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    (group,) = fake.made_groups
    digest = group.rsplit("-", 1)[-1]
    env = worker_env(fake.endpoint)
    outputs = str(tmp_path / "cflow-outputs.json")
    for args in (("cancel", run_id), ("retry", run_id, "--failed", "--detach")):
        done = subprocess.run(
            [sys.executable, "-m", "runner", *args, "--deployment", outputs],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    def drain(subscription: str) -> list[str]:
        queue = PubSubQueue(project=deployment.project, subscription=subscription)
        got: list[str] = []
        try:
            while batch := queue.receive(100, 1.0):
                got += [d.message.shard_id for d in batch if d.message.run_id == run_id]
                for d in batch:
                    queue.ack(d)
        finally:
            queue.close()
        return got

    # The 3 shards as submitted, and the 3 retried: all on the shape's own subscription.
    shaped = drain(f"{deployment.work_subscription}-{digest}")
    assert sorted(shaped) == sorted(["00000", "00001", "00002"] * 2)
    assert drain(deployment.work_subscription) == []  # the deployment's VMs never see them
    # `runner prune` keeps the shape of a run still going (and deletes nothing on --dry-run).
    prune = subprocess.run(
        [sys.executable, "-m", "runner", "prune", "--older-than", "30d", "--dry-run"],
        env={**env, "CFLOW_DEPLOYMENT": outputs},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert prune.returncode == 0, prune.stderr
    assert f"cflow: keeping shaped group {group}: run {run_id} uses it" in prune.stderr
    assert fake.deleted_groups == [] and group in fake.groups


@pytest.mark.emulator
def test_status_finds_a_shaped_runs_workers_in_its_own_group(
    deployment: Deployment, fake: FakeCompute, tmp_path: Path
) -> None:
    from worker.ledger import running_record
    from worker.protocol import Layout

    result = _submit(deployment, fake, tmp_path, "--machine-type", "n2-standard-4")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    (group,) = fake.made_groups
    vm = wait_for(lambda: next(iter(fake.live(group)), None), 30, "a VM of the shaped group")
    store = GcsStore(deployment.bucket, client=make_client(deployment.project))
    # Shard 0 runs on a VM of the run's group; shard 1's VM is gone from every group.
    for shard, worker in (("00000", vm), ("00001", f"{GROUP}-gone")):
        store.put(
            Layout.status(run_id, shard, 1),
            running_record(run_id, shard, 1, worker, time.time(), None),
        )
    status = subprocess.run(
        [sys.executable, "-m", "runner", "status", run_id, "--json"],
        env={**worker_env(fake.endpoint), "CFLOW_DEPLOYMENT": str(tmp_path / "cflow-outputs.json")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr
    states = {s["id"]: s["state"] for s in json.loads(status.stdout)["shards"]}
    assert states == {"00000": "running", "00001": "lost", "00002": "queued"}
