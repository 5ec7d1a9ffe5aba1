"""A shaped group's failure policy against the fake Compute API: a VM of a shape that powered
itself off (its worker could not leave the group) stays off, as in the deployment's group."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from runner.backends.gcp.fleet import GceFleet
from runner.backends.gcp.shapes.groups import Shapes
from runner.backends.gcp.shapes.model import Shape
from tests.e2e.conftest import wait_for
from tests.gcp.conftest import MakeCompute
from tests.gcp.fault_compute import POWERED_OFF

ZONE = "us-central1-a"
GROUP = "cflow-workers"


def powers_off(name: str) -> subprocess.Popen[Any]:
    """A VM whose worker cannot leave its group: it powers itself off at once."""
    return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({POWERED_OFF})"])


def test_a_shaped_vm_that_powered_itself_off_is_not_recreated(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=powers_off)
    shapes = Shapes(project=fake.group.project, group=GROUP, zone=ZONE)
    try:
        made = shapes.ensure(Shape.parse(machine_type="n2-standard-4"))
    finally:
        shapes.close()
    policy = fake.made_groups[made.group]["instanceLifecyclePolicy"]
    assert policy["defaultActionOnFailure"] == "DO_NOTHING"
    fleet = GceFleet(project=fake.group.project, group=made.group, zone=ZONE)
    try:
        (name,) = fleet.grow(1)
        vm = fake.groups[made.group].vms[name]
        wait_for(lambda: vm.terminated, 20, "the VM to power itself off")
        for _ in range(5):  # the group's reconciling goes on: nothing brings it back
            fake.reconcile()
        assert (vm.recreated, fake.preempted) == (0, [])
        assert fake.live(made.group) == {}
    finally:
        fleet.close()
