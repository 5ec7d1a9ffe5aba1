"""A shape's boot image against the fake Compute API: read before anything is made, the boot
disk at least as large as the image, and an image family that does not exist refused in one
line (through ``submit`` too, with nothing published)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.backends.gcp.fleet import GceFleet
from runner.backends.gcp.shapes.groups import DEFAULT_GPU_IMAGE, Shapes
from runner.backends.gcp.shapes.model import Shape, ShapeError
from tests.e2e.conftest import wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_env
from tests.gcp.fake_compute import FakeCompute, sleeper
from tests.gcp.fake_images import DLVM_DISK_GB, Image
from worker.backends.gcp.gcs import GcsStore, make_client

ZONE = "us-central1-a"
GROUP = "cflow-workers"
QUOTAS = {
    "CPUS": (64.0, 0.0),
    "PREEMPTIBLE_CPUS": (0.0, 0.0),
    "PREEMPTIBLE_NVIDIA_L4_GPUS": (4.0, 0.0),
    "SSD_TOTAL_GB": (2048.0, 0.0),
}
GONE = "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-12"


@pytest.fixture
def fake(fake_compute: MakeCompute) -> FakeCompute:
    return fake_compute(spawn=sleeper, quotas=dict(QUOTAS))


@pytest.fixture
def shapes(fake: FakeCompute) -> Iterator[Shapes]:
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    yield s
    s.close()


def _boot(fake: FakeCompute, template: str) -> dict[str, str]:
    disks = fake.templates[template]["properties"]["disks"]
    found: dict[str, str] = next(d for d in disks if d["boot"])["initializeParams"]
    return found


def test_a_gpu_shapes_boot_disk_is_as_large_as_its_image_so_its_vm_is_created(
    fake: FakeCompute, shapes: Shapes
) -> None:
    made = shapes.ensure(Shape.parse(machine_type="n1-standard-4", gpu="nvidia-l4:1"))
    boot = _boot(fake, made.template)
    assert boot["sourceImage"] == DEFAULT_GPU_IMAGE  # the default family resolves
    assert int(boot["diskSizeGb"]) == DLVM_DISK_GB  # the deployment's 20 GB would not hold it
    assert any(
        p.endswith("/global/images/family/common-cu124-debian-12-py310") for _, p in fake.requests
    )
    fleet = GceFleet(project=fake.group.project, group=made.group, zone=ZONE)
    try:
        (name,) = fleet.grow(1)
        wait_for(lambda: name in fake.live(made.group), 20, "the GPU VM")
        assert [i.error for i in fleet.instances()] == [None]
    finally:
        fleet.close()
    # Asked for more than the image: as asked. Less: refused in one line, nothing made.
    big = shapes.ensure(Shape.parse(machine_type="n1-standard-8", gpu="nvidia-l4:1", disk_gb=200))
    assert _boot(fake, big.template)["diskSizeGb"] == "200"
    templates = dict(fake.templates)
    with pytest.raises(ShapeError) as refused:
        shapes.ensure(Shape.parse(machine_type="n1-standard-16", gpu="nvidia-l4:1", disk_gb=30))
    assert str(refused.value) == (
        f"--disk-gb 30 is smaller than boot image {DEFAULT_GPU_IMAGE} ({DLVM_DISK_GB} GB): "
        f"give --disk-gb {DLVM_DISK_GB} or more"
    )
    assert fake.templates == templates
    # A CPU shape keeps the deployment's image and disk.
    cpu = shapes.ensure(Shape.parse(machine_type="n2-standard-4"))
    assert _boot(fake, cpu.template)["diskSizeGb"] == "20"


def test_the_fake_never_creates_a_vm_whose_disk_is_smaller_than_its_image(
    fake: FakeCompute,
) -> None:
    """What a GPU template with the deployment's 20 GB disk got: a VM that never exists."""
    props = {
        "machineType": "n1-standard-4",
        "scheduling": {"onHostMaintenance": "TERMINATE"},
        "disks": [
            {
                "boot": True,
                "initializeParams": {"diskSizeGb": "20", "sourceImage": DEFAULT_GPU_IMAGE},
            }
        ],
    }
    assert fake._insert_template({"name": "small-disk", "properties": props})[0] == 200
    code, _ = fake._insert_group(
        "zones", ZONE, {"name": "small-disk", "instanceTemplate": "small-disk"}
    )
    assert code == 200
    fleet = GceFleet(project=fake.group.project, group="small-disk", zone=ZONE)
    try:
        fleet.grow(1)
        (vm,) = wait_for(lambda: [i for i in fleet.instances() if i.error], 20, "the refusal")
        assert "Requested disk size cannot be smaller than the image size (50 GB)" in str(vm.error)
        assert fake.live("small-disk") == {}
    finally:
        fleet.close()


def test_an_image_family_that_does_not_exist_is_refused_in_one_line(fake: FakeCompute) -> None:
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE, gpu_image=GONE)
    try:
        with pytest.raises(ShapeError) as refused:
            s.ensure(Shape.parse(machine_type="g2-standard-8"))
    finally:
        s.close()
    line = str(refused.value)
    assert line.startswith(f"boot image {GONE} does not exist: set the deployment's gpu_image")
    assert "gcloud compute images list --project deeplearning-platform-release" in line
    assert "\n" not in line and fake.templates == {} and fake.made_groups == {}
    own = "projects/my-project/global/images/family/debian-12-podman"
    s = Shapes(project=fake.group.project, group=GROUP, zone=ZONE, container_image=own)
    try:
        with pytest.raises(ShapeError, match="set the deployment's container_image"):
            s.ensure(Shape.parse(engine=True))
        fake.images.add(Image("my-project", "debian-12-podman-v2", "debian-12-podman", 40))
        made = s.ensure(Shape.parse(engine=True))  # once it exists, its disk fits it
    finally:
        s.close()
    assert _boot(fake, made.template)["diskSizeGb"] == "40"


@pytest.mark.emulator
def test_submit_with_a_gpu_image_that_does_not_exist_ends_in_one_line_and_publishes_nothing(
    deployment: Deployment, fake: FakeCompute, tmp_path: Path
) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    return None\n")
    outputs = tmp_path / "cflow-outputs.json"
    outputs.write_text(json.dumps(deployment.outputs(zone=ZONE, group=GROUP)))
    result = subprocess.run(
        [
            *(sys.executable, "-m", "runner", "submit", str(task), "--shards", "2"),
            *("--gpu", "nvidia-l4:1", "--machine-type", "n1-standard-4"),
            *("--no-check", "--detach", "--deployment", str(outputs)),
        ],
        env=worker_env(fake.endpoint, CFLOW_GPU_IMAGE=GONE),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert f"boot image {GONE} does not exist: set the deployment's gpu_image" in last
    assert result.stdout == ""
    store = GcsStore(deployment.bucket, client=make_client(deployment.project))
    assert list(store.list("runs/")) == []
    assert fake.templates == {} and fake.made_groups == {}
