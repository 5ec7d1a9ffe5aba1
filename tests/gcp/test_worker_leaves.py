"""A worker VM's way out: self-removal, and the backstop when the group refuses it.

Real ``python -m worker --backend gcp`` processes on the emulators, in a fake group.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from runner.backends.gcp.fleet import GceFleet
from tests.e2e.conftest import wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, shaped_worker_spawner, worker_spawner
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.vm import EXIT_CANNOT_LEAVE, agent_log_key, problem_key

pytestmark = pytest.mark.emulator

ZONE = "us-central1-a"
GROUP = "cflow-workers"


def test_self_removal_without_conditions_then_the_backstop_when_refused(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    exits: list[int] = []
    holder: dict[str, str] = {}
    inner = worker_spawner(
        deployment,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
        idle_timeout=0.5,
    )
    procs: list[subprocess.Popen[Any]] = []

    def spawn(name: str) -> subprocess.Popen[Any]:
        proc = inner(name)
        procs.append(proc)
        return proc

    # First the group lets the worker remove itself (the grant carries no IAM condition the
    # service would not honour), then it refuses: the worker must still stop the bill.
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE)
    holder["endpoint"] = fake.endpoint
    store = GcsStore(deployment.bucket)
    fleet = GceFleet(project=deployment.project, group=GROUP, zone=ZONE, store=store)
    (first,) = fleet.grow(1)
    wait_for(fake.is_empty, 60, "the idle worker gone by itself")
    assert procs[0].wait(10) == 0
    log = store.get(agent_log_key(first)).decode()
    assert "left group" in log and "exiting: idle" in log  # the agent's log outlived its VM

    fake.denied = frozenset({"deleteInstances"})
    (second,) = fleet.grow(1)
    wait_for(lambda: len(procs) >= 2 and procs[1].poll() is not None, 60, "a refused worker")
    exits.append(procs[1].returncode)
    assert exits == [EXIT_CANNOT_LEAVE]  # the unit powers the VM off on this status
    report = json.loads(store.get(problem_key(second)))
    assert report["vm"] == second and "could not remove itself" in report["problem"]
    assert "could not remove VM" in store.get(agent_log_key(second)).decode()

    # The runner (or a later `runner watch`) shows it and deletes the VM by name.
    broken = wait_for(lambda: [i for i in fleet.instances() if i.removable], 30, "reported")
    assert [i.name for i in broken] == [second]
    assert fleet.problems() == [f"VM {second} could not remove itself from its group"]
    fake.denied = frozenset()
    fleet.delete([second])
    assert fleet.wait_empty(30)
    assert not store.exists(problem_key(second))


def _gone_subscription_spawner(
    deployment: Deployment, tmp_path: Path, procs: list[subprocess.Popen[Any]], endpoint: Any
) -> Any:
    """VMs whose worker pulls a subscription that does not exist (a deleted deployment or
    shape): every pull is refused with NotFound."""
    shaped = shaped_worker_spawner(
        deployment, logs=tmp_path / "vms", zone=ZONE, endpoint=endpoint, idle_timeout=60
    )
    metadata = {
        "cflow-group": GROUP,
        "cflow-subscription": f"gone-{deployment.work_subscription}",
        "cflow-work-topic": deployment.work_topic,
    }

    def spawn(name: str) -> subprocess.Popen[Any]:
        procs.append(shaped(name, metadata))
        return procs[-1]

    return spawn


def test_a_worker_whose_subscription_is_gone_leaves_instead_of_restarting(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    procs: list[subprocess.Popen[Any]] = []
    holder: dict[str, str] = {}
    spawn = _gone_subscription_spawner(deployment, tmp_path, procs, lambda: holder["endpoint"])
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE)
    holder["endpoint"] = fake.endpoint
    store = GcsStore(deployment.bucket)
    fleet = GceFleet(project=deployment.project, group=GROUP, zone=ZONE, store=store)
    (vm,) = fleet.grow(1)
    # Long before its 60 s idle timeout: the refusal is permanent, so it leaves at once.
    wait_for(fake.is_empty, 30, "the worker gone by itself")
    assert procs[0].wait(10) == 0  # a clean end: systemd does not restart it
    assert len(procs) == 1
    log = store.get(agent_log_key(vm)).decode()
    assert "cannot go on: work subscription" in log and "does not exist" in log
    assert "left group" in log
    lifetime = json.loads(store.get(f"fleet/{vm}/lifetime.json"))
    assert lifetime["stopped_at"] is not None and "does not exist" in lifetime["stop_reason"]


def test_a_vm_that_can_neither_work_nor_leave_stays_off_and_is_not_recreated(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    procs: list[subprocess.Popen[Any]] = []
    holder: dict[str, str] = {}
    spawn = _gone_subscription_spawner(deployment, tmp_path, procs, lambda: holder["endpoint"])
    # The group the stack declares (the fixture's default): a VM that powered itself off stays
    # off. Under Compute's default, REPAIR, the same VM would boot into the same failure again
    # and again, billed, with no runner watching.
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE, denied=frozenset({"deleteInstances"}))
    holder["endpoint"] = fake.endpoint
    store = GcsStore(deployment.bucket)
    fleet = GceFleet(project=deployment.project, group=GROUP, zone=ZONE, store=store)
    (vm,) = fleet.grow(1)
    wait_for(lambda: procs[0].poll() is not None, 60, "the worker to end")
    assert procs[0].returncode == EXIT_CANNOT_LEAVE  # the unit powers the VM off
    wait_for(lambda: fake.group.vms[vm].terminated, 10, "the VM TERMINATED")
    for _ in range(5):  # the group looks again and again: nothing is made
        fake.reconcile()
    assert len(procs) == 1 and fake.group.vms[vm].recreated == 0
    report = json.loads(store.get(problem_key(vm)))
    assert "could not remove itself" in report["problem"]
    # The runner sees a VM that will never work again, and why.
    assert [(i.name, i.removable) for i in fleet.instances()] == [(vm, True)]
    assert fleet.problems() == [f"VM {vm} could not remove itself from its group"]
    # The loop ends there: the runner (attached, or a later `runner watch`) deletes it by name.
    fake.denied = frozenset()
    fleet.delete([vm])
    assert fleet.wait_empty(30)
    assert len(procs) == 1


def test_runner_reads_a_gone_workers_agent_log(deployment: Deployment) -> None:
    from runner.backends.gcp.fleet import agent_log, agent_logs
    from worker.errors import NotFound

    store = GcsStore(deployment.bucket)
    store.put(agent_log_key("cflow-worker-ab12"), b"2026-12-01 worker cflow-worker-ab12 exiting\n")
    store.put("fleet/_problems/cflow-worker-ab12.json", b"{}")
    assert agent_logs(store) == ["cflow-worker-ab12"]
    assert b"exiting" in agent_log(store, "cflow-worker-ab12")
    with pytest.raises(NotFound, match="no agent log for worker nobody"):
        agent_log(store, "nobody")
