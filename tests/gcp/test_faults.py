"""The fault plan and the fakes it drives fail the way the real services do.

Each fault is checked through the real client library (google-cloud-compute,
google-cloud-storage, google-cloud-pubsub): what reaches the caller, and which error type the
client raises for it. At rate 0 every call passes through unchanged.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from typing import Any

import pytest
import requests
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1, pubsub_v1, storage

from tests.e2e.conftest import wait_for
from tests.emulators import PROJECT, Deployment
from tests.gcp.conftest import MakeCompute, MakeProxies
from tests.gcp.fake_compute import FakeCompute, sleeper
from tests.gcp.fake_images import DLVM_DISK_GB, DLVM_FAMILY, DLVM_PROJECT
from tests.gcp.fault_compute import quota_bucket
from tests.gcp.faults import FaultPlan

ZONE = "us-central1-a"
REGION = "us-central1"
GROUP = "cflow-workers"


def _managers(fake: FakeCompute) -> compute_v1.InstanceGroupManagersClient:
    options = ClientOptions(api_endpoint=fake.endpoint)
    return compute_v1.InstanceGroupManagersClient(
        credentials=AnonymousCredentials(), client_options=options, transport="rest"
    )


def _operations(fake: FakeCompute) -> compute_v1.ZoneOperationsClient:
    options = ClientOptions(api_endpoint=fake.endpoint)
    return compute_v1.ZoneOperationsClient(
        credentials=AnonymousCredentials(), client_options=options, transport="rest"
    )


def _group(**fields: Any) -> dict[str, Any]:
    return {"project": PROJECT, "zone": ZONE, "instance_group_manager": GROUP, **fields}


# -- the plan ---------------------------------------------------------------------------------


def test_a_plan_is_deterministic_per_seed_and_counts_what_it_injected() -> None:
    def draws(plan: FaultPlan) -> list[str | None]:
        return [plan.draw(site, ("a", "b")) for _ in range(200) for site in ("x", "y")]

    first, again, other = FaultPlan(0.3, seed=7), FaultPlan(0.3, seed=7), FaultPlan(0.3, seed=8)
    assert draws(first) == draws(again) != draws(other)
    hits = [d for d in draws(FaultPlan(0.3, seed=7)) if d]
    assert 80 < len(hits) < 160 and {"a", "b"} == set(hits)
    assert first.total() == len(hits) and first.total("a") + first.total("b") == len(hits)
    assert all(d is None for d in draws(FaultPlan(0.0, seed=7)))
    only = FaultPlan(1.0, kinds={"b"})
    assert {only.draw("x", ("a", "b")) for _ in range(20)} == {"b"}
    with only.suspended():
        assert only.draw("x", ("a", "b")) is None
    with pytest.raises(ValueError, match="probability"):
        FaultPlan(1.5)


def test_a_plan_is_thread_safe() -> None:
    plan = FaultPlan(0.5, seed=1)

    def hammer() -> None:
        for _ in range(2000):
            plan.draw("site", ("a",))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    serial = FaultPlan(0.5, seed=1)
    expected = sum(serial.draw("site", ("a",)) is not None for _ in range(8000))
    assert plan.total() == expected


# -- Compute ----------------------------------------------------------------------------------


def test_compute_at_rate_zero_passes_every_call(fake_compute: MakeCompute) -> None:
    plan = FaultPlan(0.0, seed=3)
    fake = fake_compute(spawn=sleeper, zone=ZONE, faults=plan)
    managers = _managers(fake)
    for _ in range(20):
        assert managers.get(request=_group()).target_size == 0
    op = managers.resize(request=_group(size=1))
    assert op.status == compute_v1.Operation.Status.DONE
    wait_for(lambda: len(fake.live()) == 1, 10, "one VM")
    assert plan.total() == 0 and fake.rate_limited == 0


@pytest.mark.parametrize(
    ("kind", "raised"),
    [
        ("5xx", (gexc.InternalServerError, gexc.BadGateway, gexc.ServiceUnavailable)),
        ("rate_limit", (gexc.Forbidden,)),
        ("reset", (requests.exceptions.ConnectionError,)),
    ],
)
def test_compute_faults_reach_the_client_as_the_real_ones(
    fake_compute: MakeCompute, kind: str, raised: tuple[type[BaseException], ...]
) -> None:
    plan = FaultPlan(1.0, seed=1, kinds={kind})
    fake = fake_compute(spawn=sleeper, zone=ZONE, faults=plan)
    with pytest.raises(raised) as caught:
        _managers(fake).get(request=_group(), retry=None)
    assert plan.total(kind) == 1
    if kind == "rate_limit":
        assert isinstance(caught.value, gexc.Forbidden)
        assert [e["reason"] for e in caught.value.errors] == ["rateLimitExceeded"]
        # The whole read group of the project and region stays refused until the next minute.
        with plan.suspended(), pytest.raises(gexc.Forbidden):
            _managers(fake).get(request=_group())


def test_a_timeout_carries_the_call_out_and_loses_its_answer(fake_compute: MakeCompute) -> None:
    plan = FaultPlan(1.0, seed=1, kinds={"timeout"}, hang=2.0)
    fake = fake_compute(spawn=sleeper, zone=ZONE, faults=plan)
    with pytest.raises(requests.exceptions.ReadTimeout):
        _managers(fake).resize(request=_group(size=1), timeout=0.3)
    with plan.suspended():
        wait_for(lambda: len(fake.live()) == 1, 10, "the resize done all the same")


def test_rate_quotas_are_per_group_and_refill_at_the_next_synchronized_minute(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, zone=ZONE, rate_limit=2)
    now = [1_800_000_015.0]  # 15 s into a minute
    fake.clock = lambda: now[0]
    managers = _managers(fake)
    managers.get(request=_group())
    managers.get(request=_group())
    with pytest.raises(gexc.Forbidden) as refused:
        managers.get(request=_group())
    assert [e["reason"] for e in refused.value.errors] == ["rateLimitExceeded"]
    list(managers.list_managed_instances(request=_group()))  # lists are a group of their own
    managers.resize(request=_group(size=0))  # and so are writes
    now[0] += 44.0  # 59 s into the minute: still refused
    with pytest.raises(gexc.Forbidden):
        managers.get(request=_group())
    now[0] += 1.0  # the next minute
    managers.get(request=_group())
    # Another region's quota is another bucket.
    read = quota_bucket("GET", f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/x/y")
    other = quota_bucket("GET", f"/compute/v1/projects/{PROJECT}/zones/europe-west4-a/x/y")
    assert read != other and read[1] == f"region/{REGION}"
    assert fake.rate_limited == 2


def test_slow_operations_pend_then_end_done_or_in_error(fake_compute: MakeCompute) -> None:
    plan = FaultPlan(1.0, seed=2, kinds={"slow_operation"}, delay=5.0)
    fake = fake_compute(spawn=sleeper, zone=ZONE, faults=plan)
    now = [1_800_000_000.0]
    fake.clock = lambda: now[0]
    managers, operations = _managers(fake), _operations(fake)
    op = managers.resize(request=_group(size=1))
    assert op.status == compute_v1.Operation.Status.PENDING
    with plan.suspended():
        got = operations.get(project=PROJECT, zone=ZONE, operation=op.name)
        assert got.status == compute_v1.Operation.Status.PENDING
        now[0] += 5.0
        got = operations.wait(project=PROJECT, zone=ZONE, operation=op.name)
    assert got.status == compute_v1.Operation.Status.DONE and not got.error.errors

    failing = FaultPlan(1.0, seed=2, kinds={"operation_error"}, delay=0.0)
    fake.faults.plan = failing
    op = managers.resize(request=_group(size=3))
    with failing.suspended():
        done = operations.wait(project=PROJECT, zone=ZONE, operation=op.name)
        assert done.status == compute_v1.Operation.Status.DONE
        assert done.error.errors[0].code in ("RESOURCE_NOT_READY", "INTERNAL_ERROR")
        assert done.http_error_status_code in (400, 500)
        assert managers.get(request=_group()).target_size == 1  # the failed resize never happened


def test_new_vms_may_come_late_and_spot_ones_hit_stockouts(fake_compute: MakeCompute) -> None:
    plan = FaultPlan(1.0, seed=4, kinds={"slow_create", "stockout"}, delay=30.0)
    fake = fake_compute(spawn=sleeper, zone=ZONE, faults=plan)
    now = [1_800_000_000.0]
    fake.clock = lambda: now[0]
    managers = _managers(fake)  # calls themselves never fail: only creation kinds are drawn
    managers.resize(request=_group(size=1))
    wait_for(lambda: plan.total("slow_create") == 1, 10, "the VM drawn late")
    (late,) = managers.list_managed_instances(request=_group())
    assert late.current_action == "CREATING" and not late.instance_status and not fake.live()
    now[0] += 30.0  # due now; the deployment's template is Spot, and the plan says stockout
    wait_for(lambda: plan.total("stockout") >= 1, 10, "a stockout drawn")
    (out,) = managers.list_managed_instances(request=_group())
    assert [e.code for e in out.last_attempt.errors.errors] == ["ZONE_RESOURCE_POOL_EXHAUSTED"]
    assert f"zones/{ZONE}" in out.last_attempt.errors.errors[0].message
    assert plan.total("slow_create") == 1 and not fake.live()


def test_vm_creation_fails_with_stockouts_and_series_quota(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, zone=None, region=REGION)
    fake.faults.stockouts.add(f"{REGION}-b")
    _insert_template(fake, "spot-c2", "c2-standard-8", spot=True)
    _insert_template(fake, "std-n2", "n2-standard-8", spot=False)
    fake.quotas["N2_CPUS"] = (16.0, 0.0)
    _insert_group(fake, "spot", "spot-c2", zones=[f"{REGION}-b"], size=1)
    _insert_group(fake, "std", "std-n2", zones=[f"{REGION}-c"], size=3)

    def errors(group: str) -> list[str]:
        managed = _region_managers(fake).list_managed_instances(
            project=PROJECT, region=REGION, instance_group_manager=group
        )
        return [e.code for m in managed for e in m.last_attempt.errors.errors]

    stockout = wait_for(lambda: errors("spot") or None, 10, "a stockout")
    assert stockout == ["ZONE_RESOURCE_POOL_EXHAUSTED"]
    assert wait_for(lambda: errors("std") or None, 10, "N2_CPUS used up") == ["QUOTA_EXCEEDED"]
    assert len(fake.live("std")) == 2  # 16 N2 CPUs: two n2-standard-8
    fake.faults.stockouts.clear()
    wait_for(lambda: len(fake.live("spot")) == 1, 10, "capacity back")


def test_a_disk_smaller_than_its_image_and_a_missing_family_are_refused(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, zone=None, region=REGION)
    options = ClientOptions(api_endpoint=fake.endpoint)
    images = compute_v1.ImagesClient(
        credentials=AnonymousCredentials(), client_options=options, transport="rest"
    )
    found = images.get_from_family(project=DLVM_PROJECT, family=DLVM_FAMILY)
    assert found.disk_size_gb == DLVM_DISK_GB
    with pytest.raises(gexc.NotFound, match="common-cu124-debian-12"):
        images.get_from_family(project=DLVM_PROJECT, family="common-cu124-debian-12")
    family = f"projects/{DLVM_PROJECT}/global/images/family/{DLVM_FAMILY}"
    disk = {"boot": True, "initializeParams": {"diskSizeGb": "20", "sourceImage": family}}
    body = {"name": "gpu", "properties": {"machineType": "e2-standard-2", "disks": [disk]}}
    url = f"{fake.endpoint}/compute/v1/projects/{PROJECT}/global/instanceTemplates"
    assert requests.post(url, json=body, timeout=10).status_code == 200
    _insert_group(fake, "gpu", "gpu", zones=[f"{REGION}-b"], size=1)
    managed = _region_managers(fake)

    def refused() -> list[compute_v1.Error] | None:
        listed = managed.list_managed_instances(
            project=PROJECT, region=REGION, instance_group_manager="gpu"
        )
        return [e for m in listed for e in m.last_attempt.errors.errors] or None

    (error,) = wait_for(refused, 10, "the VM refused")
    assert error.message == (
        "Invalid value for field 'resource.disks[0].initializeParams.diskSizeGb': '20'. "
        f"Requested disk size cannot be smaller than the image size ({DLVM_DISK_GB} GB)"
    )
    assert not fake.live("gpu")


def test_delete_instances_refuses_malformed_and_foreign_urls(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, zone=ZONE)
    managers = _managers(fake)
    managers.resize(request=_group(size=1))
    (name,) = wait_for(lambda: list(fake.live()) or None, 10, "one VM")
    for url in (name, f"zones/{ZONE}/instance/{name}", f"zones/europe-west4-a/instances/{name}"):
        body = {"instances": [url], "skip_instances_on_validation_error": True}
        with pytest.raises(gexc.BadRequest, match=r"resource\.instances"):
            managers.delete_instances(
                request=_group(instance_group_managers_delete_instances_request_resource=body)
            )
    good = {"instances": [f"projects/{PROJECT}/zones/{ZONE}/instances/{name}"]}
    managers.delete_instances(
        request=_group(instance_group_managers_delete_instances_request_resource=good)
    )
    wait_for(lambda: fake.is_empty(), 10, "the VM deleted")


@pytest.mark.parametrize("action", ["REPAIR", "DO_NOTHING"])
def test_a_vm_that_powered_itself_off_is_repaired_or_left(
    fake_compute: MakeCompute, action: str
) -> None:
    started: list[str] = []

    def powers_off(name: str) -> subprocess.Popen[Any]:
        started.append(name)  # the worker could not leave: status 75, the VM powers off
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(75)"])

    fake = fake_compute(spawn=powers_off, zone=ZONE, default_action_on_failure=action)
    managers = _managers(fake)
    assert managers.get(request=_group()).instance_lifecycle_policy.default_action_on_failure == (
        action
    )
    managers.resize(request=_group(size=1))
    if action == "REPAIR":
        wait_for(lambda: len(started) >= 3, 10, "the VM recreated again and again")
        return
    managed = wait_for(
        lambda: (
            [
                m
                for m in managers.list_managed_instances(request=_group())
                if m.instance_status == "TERMINATED"
            ]
            or None
        ),
        10,
        "the VM left TERMINATED",
    )
    assert len(managed) == 1 and len(started) == 1 and fake.preempted == []
    body = {"instances": [managed[0].instance]}
    managers.delete_instances(
        request=_group(instance_group_managers_delete_instances_request_resource=body)
    )
    wait_for(lambda: fake.is_empty(), 10, "the TERMINATED VM deleted")


def _region_managers(fake: FakeCompute) -> compute_v1.RegionInstanceGroupManagersClient:
    options = ClientOptions(api_endpoint=fake.endpoint)
    return compute_v1.RegionInstanceGroupManagersClient(
        credentials=AnonymousCredentials(), client_options=options, transport="rest"
    )


def _insert_template(fake: FakeCompute, name: str, machine_type: str, *, spot: bool) -> None:
    scheduling = {"provisioningModel": "SPOT" if spot else "STANDARD"}
    body = {"name": name, "properties": {"machineType": machine_type, "scheduling": scheduling}}
    url = f"{fake.endpoint}/compute/v1/projects/{PROJECT}/global/instanceTemplates"
    assert requests.post(url, json=body, timeout=10).status_code == 200


def _insert_group(
    fake: FakeCompute, name: str, template: str, *, zones: list[str], size: int
) -> None:
    body = {
        "name": name,
        "instanceTemplate": f"global/instanceTemplates/{template}",
        "targetSize": size,
        "distributionPolicy": {"zones": [{"zone": f"zones/{z}"} for z in zones]},
    }
    url = f"{fake.endpoint}/compute/v1/projects/{PROJECT}/regions/{REGION}/instanceGroupManagers"
    assert requests.post(url, json=body, timeout=10).status_code == 200


# -- Cloud Storage through the proxy ----------------------------------------------------------


def test_gcs_at_rate_zero_passes_every_call(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    plan = FaultPlan(0.0, seed=5)
    proxies = fault_proxies(plan)
    now = [0.0]
    proxies.gcs.clock = lambda: now[0]
    bucket = storage.Client(project=PROJECT).bucket(deployment.bucket)
    bucket.blob("a.txt").upload_from_string(b"alpha\n")
    big = bucket.blob("b.bin", chunk_size=256 * 1024)  # a resumable upload, in chunks
    payload = bytes(range(256)) * 2048
    big.upload_from_string(payload)
    assert bucket.blob("b.bin").download_as_bytes() == payload
    bucket.blob("c.txt").compose([bucket.blob("a.txt"), bucket.blob("a.txt")])
    assert bucket.blob("c.txt").download_as_bytes() == b"alpha\nalpha\n"
    assert sorted(b.name for b in bucket.list_blobs()) == ["a.txt", "b.bin", "c.txt"]
    now[0] += 1.0  # a.txt was written a second ago: it may be written again
    bucket.blob("a.txt").delete()
    assert not bucket.blob("a.txt").exists()
    assert plan.total() == 0 and proxies.gcs.refused_writes == 0


@pytest.mark.parametrize(
    ("kind", "raised", "reason"),
    [
        ("503", gexc.ServiceUnavailable, "backendError"),
        ("500", gexc.InternalServerError, "internalError"),
        ("429", gexc.TooManyRequests, "rateLimitExceeded"),
    ],
)
def test_gcs_faults_reach_the_client_as_the_real_ones(
    deployment: Deployment,
    fault_proxies: MakeProxies,
    kind: str,
    raised: type[gexc.GoogleAPICallError],
    reason: str,
) -> None:
    plan = FaultPlan(1.0, seed=5, kinds={kind})
    fault_proxies(plan)
    blob = storage.Client(project=PROJECT).bucket(deployment.bucket).blob("x.txt")
    with pytest.raises(raised) as caught:
        blob.upload_from_string(b"x", retry=None)
    assert plan.total(kind) >= 1
    # The upload path raises from the status and the error's message; a JSON call keeps the
    # error's reasons too.
    assert _GCS_MESSAGES[kind] in caught.value.message
    with pytest.raises(raised) as listed:
        list(storage.Client(project=PROJECT).bucket(deployment.bucket).list_blobs(retry=None))
    assert [e["reason"] for e in listed.value.errors] == [reason]


_GCS_MESSAGES = {"503": "Backend Error", "500": "Internal Error", "429": "exceeded the rate limit"}


def test_gcs_refuses_a_second_write_to_one_object_within_a_second(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    proxies = fault_proxies(FaultPlan(0.0))
    now = [100.0]
    proxies.gcs.clock = lambda: now[0]
    bucket = storage.Client(project=PROJECT).bucket(deployment.bucket)
    bucket.blob("m.json").upload_from_string(b"1", retry=None)
    bucket.blob("other.json").upload_from_string(b"1", retry=None)  # another name is free
    with pytest.raises(gexc.TooManyRequests, match="object mutation"):
        bucket.blob("m.json").upload_from_string(b"2", retry=None)
    with pytest.raises(gexc.TooManyRequests):
        bucket.blob("m.json").delete(retry=None)
    now[0] += 1.0
    bucket.blob("m.json").upload_from_string(b"3", retry=None)
    assert bucket.blob("m.json").download_as_bytes() == b"3"
    assert proxies.gcs.refused_writes == 2


# -- Pub/Sub through the proxy ----------------------------------------------------------------


def test_pubsub_at_rate_zero_passes_unary_and_streaming_calls(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    plan = FaultPlan(0.0, seed=9)
    fault_proxies(plan)
    got = _publish_and_stream(deployment, [b"one", b"two", b"three"])
    assert sorted(got) == [b"one", b"three", b"two"]
    assert plan.total() == 0


@pytest.mark.parametrize(
    ("kind", "raised"),
    [
        ("UNAVAILABLE", gexc.ServiceUnavailable),
        ("DEADLINE_EXCEEDED", gexc.DeadlineExceeded),
        ("RESOURCE_EXHAUSTED", gexc.ResourceExhausted),
    ],
)
def test_pubsub_faults_reach_the_client_as_the_real_ones(
    deployment: Deployment,
    fault_proxies: MakeProxies,
    kind: str,
    raised: type[gexc.GoogleAPICallError],
) -> None:
    plan = FaultPlan(1.0, seed=9, kinds={kind})
    fault_proxies(plan)
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, deployment.work_topic)
    with pytest.raises(raised):
        publisher.get_topic(topic=topic, retry=None)
    assert plan.total(kind) == 1


def test_a_cut_streaming_pull_is_reopened_by_the_client(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    plan = FaultPlan(1.0, seed=9, kinds={"cut_stream"}, hang=0.5)
    proxies = fault_proxies(plan)
    got = _publish_and_stream(deployment, [b"a", b"b", b"c"])
    assert sorted(got) == [b"a", b"b", b"c"]
    assert proxies.pubsub.cut_streams >= 1 and plan.total("cut_stream") >= 1


def _publish_and_stream(deployment: Deployment, data: list[bytes]) -> list[bytes]:
    """Publish ``data`` and receive it all over a streaming pull (each message acked)."""
    publisher = pubsub_v1.PublisherClient()
    topic = publisher.topic_path(PROJECT, deployment.work_topic)
    for item in data:
        publisher.publish(topic, item).result(timeout=30)
    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(PROJECT, deployment.work_subscription)
    got: list[bytes] = []
    lock = threading.Lock()
    everything = threading.Event()

    def take(message: Any) -> None:
        message.ack()
        with lock:
            if message.data not in got:
                got.append(message.data)
            if len(got) == len(data):
                everything.set()

    future = subscriber.subscribe(path, take)
    try:
        assert everything.wait(30), f"received only {got}"
    finally:
        future.cancel()
        with contextlib.suppress(Exception):
            future.result(timeout=10)
        subscriber.close()
    return got
