"""The managed-instance-group fleet against the fake Compute API, through the real client."""

from __future__ import annotations

import pytest

from runner.backends.gcp.fleet import GceFleet
from tests.e2e.conftest import wait_for
from tests.emulators import PROJECT
from tests.gcp.conftest import MakeCompute
from tests.gcp.fake_compute import sleeper
from worker.backends.gcp.vm import leave_group
from worker.errors import BackendError


def test_grow_lists_and_deletes_by_name_never_resizing_down(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, zone="europe-west1-b")
    fleet = GceFleet(project=PROJECT, group="cflow-workers", zone="europe-west1-b")
    assert fleet.instances() == []
    names = fleet.grow(3)
    assert len(names) == 3 and fleet.target_size() == 3
    wait_for(lambda: {i.status for i in fleet.instances()} == {"running"}, 10, "running VMs")
    assert sorted(fake.live()) == names

    fleet.delete([names[0], "not-a-member"])
    assert fleet.target_size() == 2
    wait_for(lambda: [i.name for i in fleet.instances()] == names[1:], 10, "one deleted")
    assert fleet.grow(1) and fleet.target_size() == 3

    fleet.delete(i.name for i in fleet.instances())
    assert fleet.wait_empty(10)
    assert fake.is_empty() and fake.live() == {}
    assert not fake.resized_down()
    assert not any(
        "/resize?" in p and "size=0" in p.split("?")[1].split("&") for _, p in fake.requests
    )


def test_regional_group(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, zone=None, region="us-east1")
    fleet = GceFleet(project=PROJECT, group="cflow-workers", region="us-east1")
    (name,) = fleet.grow(1)
    wait_for(lambda: fleet.instances() and fleet.instances()[0].status == "running", 10, "VM")
    fleet.delete([name])
    assert fleet.wait_empty(10) and fake.is_empty()
    assert any("/regions/us-east1/instanceGroupManagers/" in p for _, p in fake.requests)


def test_preempted_instance_is_recreated_under_its_name(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper)
    fleet = GceFleet(project=PROJECT, group="cflow-workers", zone="us-central1-a")
    (name,) = fleet.grow(1)
    first = wait_for(lambda: fake.live().get(name), 10, "VM started")
    first.kill()  # Spot preemption
    wait_for(lambda: (p := fake.live().get(name)) is not None and p.pid != first.pid, 10, "new")
    assert fleet.target_size() == 1 and fake.preempted == [name]
    fleet.delete([name])
    assert fleet.wait_empty(10)


def test_missing_group_says_so(fake_compute: MakeCompute) -> None:
    fake_compute(spawn=sleeper)
    fleet = GceFleet(project=PROJECT, group="no-such-group", zone="us-central1-a")
    with pytest.raises(BackendError, match="instance group no-such-group in zone us-central1-a"):
        fleet.instances()


def test_worker_leaves_its_group_by_deleting_itself(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper)
    fleet = GceFleet(project=PROJECT, group="cflow-workers", zone="us-central1-a")
    a, b = fleet.grow(2)
    wait_for(lambda: len(fake.live()) == 2, 10, "two VMs")
    assert leave_group(
        project=PROJECT, group="cflow-workers", zone="us-central1-a", region=None, instance=a
    )
    wait_for(lambda: [i.name for i in fleet.instances()] == [b], 10, "VM gone")
    assert fleet.target_size() == 1  # not recreated
    assert not leave_group(
        project=PROJECT, group="other", zone="us-central1-a", region=None, instance=b
    )
    fleet.delete([b])
    assert fleet.wait_empty(10)
