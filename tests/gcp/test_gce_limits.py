"""The fleet and the worker against a fake Compute API that refuses like the real one.

Quota, rate limits, the 1,000-instance request limit, group size limits, permission errors and
VMs that report a failed boot: each path has a test named after it.
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import requests

from runner.backends.gcp.fleet import GceFleet
from runner.engine.fleet import Instance
from runner.engine.policy import decide_scale
from tests.e2e.conftest import wait_for
from tests.emulators import PROJECT, Deployment
from tests.gcp.conftest import MakeCompute, ShortClock
from tests.gcp.fake_compute import paper, sleeper
from tests.gcp.fault_compute import quota_bucket
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.vm import leave_group, problem_key, report_problem
from worker.errors import BackendError, ConfigError

ZONE = "us-central1-a"
GROUP = "cflow-workers"


def _group_url(endpoint: str, scope: str) -> str:
    return f"{endpoint}/compute/v1/projects/{PROJECT}/{scope}/instanceGroupManagers/{GROUP}"


def test_deletes_of_more_than_1000_instances_go_in_batches_and_lists_are_paged(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=paper, zone=None, region="us-east1")
    fleet = GceFleet(project=PROJECT, group=GROUP, region="us-east1")
    fleet.grow(1500)
    wait_for(lambda: len(fake.live()) == 1500, 20, "1,500 VMs")
    listed = [i.name for i in fleet.instances()]
    assert len(listed) == len(set(listed)) == 1500
    pages = [p for m, p in fake.requests if "listManagedInstances" in p and "pageToken" in p]
    assert pages, "1,500 instances take more than one page"

    fleet.delete(listed)
    deletes = [p for m, p in fake.requests if p.split("?")[0].endswith("/deleteInstances")]
    assert len(deletes) == 2
    assert fleet.wait_empty(20) and fake.is_empty()

    # The fake itself refuses a request the real API refuses.
    body = {"instances": [f"zones/us-east1-b/instances/vm-{i}" for i in range(1001)]}
    response = requests.post(
        f"{_group_url(fake.endpoint, 'regions/us-east1')}/deleteInstances", json=body, timeout=10
    )
    assert response.status_code == 400 and "At most 1000" in response.json()["error"]["message"]


def test_group_size_limits_are_refused_with_one_line(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=paper, zone=ZONE)
    fleet = GceFleet(project=PROJECT, group=GROUP, zone=ZONE)
    assert fleet.max_size == 1000
    with pytest.raises(ConfigError, match=r"^1001 VMs is more than a zonal instance group holds"):
        fleet.grow(1001)
    assert fake.resizes == []
    response = requests.post(
        f"{_group_url(fake.endpoint, f'zones/{ZONE}')}/resize?size=1001", timeout=10
    )
    assert response.status_code == 400
    assert GceFleet(project=PROJECT, group=GROUP, region="us-central1").max_size == 2000


def test_quota_exceeded_instances_are_reported_and_not_counted_as_capacity(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, zone=ZONE, cpu_quota=4, cpus_per_vm=2)
    fleet = GceFleet(project=PROJECT, group=GROUP, zone=ZONE)
    fleet.grow(4)
    wait_for(lambda: len(fake.live()) == 2, 10, "two VMs within quota")
    instances = fleet.instances()
    errored = [i for i in instances if i.error]
    assert len(errored) == 2 and all(i.status == "starting" for i in errored)
    assert (
        errored[0].error
        == "QUOTA_EXCEEDED: Quota 'CPUS' exceeded.  Limit: 4.0 in region us-central1."
    )
    assert fleet.problems() == [
        "2 VMs cannot start: QUOTA_EXCEEDED: Quota 'CPUS' exceeded.  Limit: 4.0 in region "
        "us-central1."
    ]
    # Four shards, four workers allowed: the two that cannot start are no capacity, and asking
    # the group for more would only queue more of what the project cannot give.
    decision = decide_scale(
        outstanding=4, max_workers=4, slots=1, instances=instances, idle=set(), busy=set()
    )
    assert decision.add == 0 and decision.delete == []
    # Once the work is down to what runs, the ones that cannot start go first.
    running = [i.name for i in instances if not i.error]
    decision = decide_scale(
        outstanding=2, max_workers=4, slots=1, instances=instances, idle=set(), busy=set(running)
    )
    assert sorted(decision.delete) == sorted(i.name for i in errored)
    # Quota freed: a VM that could not start does.
    fleet.delete(running[:1])
    wait_for(lambda: sum(1 for i in fleet.instances() if i.error) == 1, 10, "one more started")
    fleet.delete(i.name for i in fleet.instances())
    assert fleet.wait_empty(10)


def test_rate_limited_calls_are_retried_not_reported_as_permission_errors(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, zone=ZONE, rate_limit=2)  # a minute's window
    clock = ShortClock()  # the runner's waits into the next window, on the fake's clock too
    # The fake's now is a window's start whenever a quota is used up below, so a refusal
    # never lapses by itself, however slow the machine, only by a wait into the next window
    # (a half-second window did lapse, on a loaded machine, before the first try).
    window = fake.rate_window
    align = [0.0]

    def at_window_start() -> None:
        align[0] = window - clock.time() % window + 0.001  # just inside it

    fake.clock = lambda: clock.time() + align[0]
    at_window_start()
    fleet = GceFleet(project=PROJECT, group=GROUP, zone=ZONE, clock=clock)
    group_path = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/instanceGroupManagers/{GROUP}"
    # This window's read quota used up: the group's get is refused until the next window.
    fake.faults.quota.exhaust(quota_bucket("GET", group_path), fake.rate_window, fake.clock())
    a, b = fleet.grow(2)
    assert fake.rate_limited > 0
    wait_for(lambda: len(fake.live()) == 2, 20, "two VMs")
    before = fake.rate_limited
    slept: list[float] = []

    def nap(seconds: float) -> None:
        slept.append(seconds)
        clock.sleep(window)  # into the fake's next window, whatever the backoff asked for

    # This window's write quota used up, so the worker's first try is refused.
    write = quota_bucket("POST", f"{group_path}/deleteInstances")
    at_window_start()
    fake.faults.quota.exhaust(write, fake.rate_window, fake.clock())
    assert leave_group(project=PROJECT, group=GROUP, zone=ZONE, region=None, instance=a, sleep=nap)
    assert fake.rate_limited > before and slept
    fleet.delete([b])
    assert fleet.wait_empty(20)


def test_a_real_permission_error_is_final_and_one_line(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, zone=ZONE, denied=frozenset({"deleteInstances"}))
    fleet = GceFleet(project=PROJECT, group=GROUP, zone=ZONE)
    (name,) = fleet.grow(1)
    wait_for(lambda: len(fake.live()) == 1, 10, "one VM")
    slept: list[float] = []
    assert not leave_group(
        project=PROJECT, group=GROUP, zone=ZONE, region=None, instance=name, sleep=slept.append
    )
    assert slept == []  # no retries of a refusal
    with pytest.raises(BackendError) as err:
        fleet.delete([name])
    message = str(err.value)
    assert message.startswith("no permission to delete instances of instance group")
    assert "\n" not in message and "compute.instanceGroupManagers.update" in message
    fake.denied = frozenset()
    fleet.delete([name])
    assert fleet.wait_empty(10)


def test_failed_boot_is_shown_and_the_vm_removed(
    fake_compute: MakeCompute, deployment: Deployment
) -> None:
    store = GcsStore(deployment.bucket)

    def failed_boot(name: str) -> subprocess.Popen[Any]:
        # What infra/scripts/startup.sh does when a step fails: report, with its log's last line.
        report_problem(store, name, "failed to boot: E: Unable to locate package python3-venv")
        return sleeper(name)

    first: list[str] = []

    def fails(name: str) -> bool:
        if not first:
            first.append(name)
        return name == first[0]

    fake = fake_compute(spawn=sleeper, zone=ZONE, boot_fails=fails, failed_spawn=failed_boot)
    fleet = GceFleet(project=PROJECT, group=GROUP, zone=ZONE, store=store)
    fleet.grow(2)
    wait_for(lambda: len(fake.live()) == 2, 10, "two VMs up")
    (bad,) = fake.boot_failed

    def reported() -> list[Instance] | None:
        found = fleet.instances()
        return found if any(i.removable for i in found) else None

    instances = wait_for(reported, 10, "the boot failure reported")
    broken = [i for i in instances if i.removable]
    assert [i.name for i in broken] == [bad]
    assert fleet.problems() == [
        f"VM {bad} failed to boot: E: Unable to locate package python3-venv"
    ]
    decision = decide_scale(
        outstanding=2, max_workers=2, slots=1, instances=instances, idle=set(), busy=set()
    )
    assert decision.delete == [bad] and decision.add == 1  # replaced at once
    fleet.delete(decision.delete)
    wait_for(lambda: bad not in {i.name for i in fleet.instances()}, 10, "bad VM gone")
    assert not store.exists(problem_key(bad))  # a VM recreated under the name starts clean
    fleet.delete(i.name for i in fleet.instances())
    assert fleet.wait_empty(10)


def test_a_rate_limited_page_does_not_shorten_the_list(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=paper, zone=None, region="us-east1")
    clock = ShortClock()  # the runner's waits into the next window, on the fake's clock too
    align = [0.0]
    fake.clock = lambda: clock.time() + align[0]
    fleet = GceFleet(project=PROJECT, group=GROUP, region="us-east1", clock=clock)
    fleet.grow(1200)
    wait_for(lambda: len(fake.live()) == 1200, 20, "1,200 VMs")
    # One call a minute, from the start of a window on the fake's clock: the second page is
    # refused however slowly the first came (a 0.3 s window could lapse in between), and each
    # refused page waits into the next window.
    align[0] = fake.rate_window - clock.time() % fake.rate_window + 0.001
    fake.rate_limit = 1
    assert len(fleet.instances()) == 1200
    assert fake.rate_limited > 0
    fake.rate_limit = None
    fleet.delete(i.name for i in fleet.instances())
    assert fleet.wait_empty(20)
