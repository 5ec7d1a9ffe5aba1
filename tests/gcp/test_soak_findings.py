"""Calls that a chaos soak on the Google Cloud path found failing, each at the level it fails.

Each test drives the real client libraries against the emulators (through the fault proxies of
tests/gcp/fault_proxies.py) or the fake Compute API, with the one failure the soak met.
"""

from __future__ import annotations

from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from runner.backends.gcp.shapes.groups import Shapes
from runner.backends.gcp.shapes.model import Shape
from runner.backends.gcp.shapes.queues import ShapeQueues, _failed
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, MakeProxies, ShortClock
from tests.gcp.fake_compute import FakeCompute, sleeper
from tests.gcp.faults import FaultPlan
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.clock import SYSTEM_CLOCK

QUOTAS = {"CPUS": (64.0, 0.0), "PREEMPTIBLE_CPUS": (0.0, 0.0), "N2_CPUS": (64.0, 0.0)}


def _store(deployment: Deployment) -> GcsStore:
    return GcsStore(deployment.bucket, client=make_client(deployment.project))


def test_writes_to_one_object_within_a_second_are_retried(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    proxies = fault_proxies(FaultPlan(0.0))  # only GCS's one write a second to one name
    # Wider than a second, so that a loaded machine cannot space two writes by accident.
    proxies.gcs.same_object_interval = 3.0
    first, second = _store(deployment), _store(deployment)  # two clients: none spaces the other
    assert first.create("runs/r/run.json", b"1")
    second.put("runs/r/run.json", b"2")  # within 3 s of the first: refused, then retried
    assert proxies.gcs.refused_writes >= 1
    assert first.update("runs/r/run.json", lambda old: old + b"3") == b"23"
    first.put("runs/r/run.json", b"4")
    assert second.get("runs/r/run.json") == b"4"


# -- Compute: a shape's template and group made while their operations take time --------------

ZONE = "us-central1-a"
GROUP = "cflow-workers"


def _shapes(fake: FakeCompute, clock: ShortClock | None = None) -> Shapes:
    return Shapes(project=fake.group.project, group=GROUP, zone=ZONE, clock=clock or SYSTEM_CLOCK)


def _waited_at(fake: FakeCompute, scope: str) -> list[str]:
    return [p for m, p in fake.requests if f"/{scope}/" in p and "/operations/" in p]


def test_slow_shape_operations_are_waited_on_at_the_configured_endpoint(
    fake_compute: MakeCompute,
) -> None:
    # Every mutation's operation stays PENDING, then RUNNING, for up to 0.5 s.
    plan = FaultPlan(1.0, seed=12, kinds=["slow_operation"], delay=0.5)
    fake = fake_compute(spawn=sleeper, quotas=dict(QUOTAS), faults=plan)
    shapes = _shapes(fake)
    try:
        made = shapes.ensure(Shape.parse(machine_type="n2-standard-4"))
        assert made.created and made.template in fake.templates
        assert made.group in fake.made_groups
        shapes.delete_group(made.group)
        assert made.group not in fake.made_groups and made.template not in fake.templates
    finally:
        shapes.close()
    assert plan.total("slow_operation") >= 4  # both inserts and both deletes were slow
    # Their operations were read here, the template's global one and the group's zonal one.
    assert _waited_at(fake, "global") and _waited_at(fake, f"zones/{ZONE}")


def test_a_shape_operation_that_ends_in_a_transient_error_is_started_again(
    fake_compute: MakeCompute,
) -> None:
    # The first mutations' operations end in error (500 INTERNAL_ERROR or RESOURCE_NOT_READY:
    # nothing was made); later ones pass.
    plan = FaultPlan(0.6, seed=3, kinds=["operation_error"], delay=0.2)
    fake = fake_compute(spawn=sleeper, quotas=dict(QUOTAS), faults=plan)
    clock = ShortClock(most=0.05)
    shapes = _shapes(fake, clock)
    try:
        made = shapes.ensure(Shape.parse(machine_type="n2-standard-4"))
    finally:
        shapes.close()
    assert plan.total("operation_error") >= 1
    assert made.template in fake.templates and made.group in fake.made_groups
    assert clock.pauses  # each failed operation was backed off before its mutation again


# -- Pub/Sub: a shape's queues made while Pub/Sub answers DEADLINE_EXCEEDED now and then -------


def _iam_answer(client: Any, resource: str) -> str:
    try:
        return str(
            client.get_iam_policy(request={"resource": resource})
        )  # no deadline, as ShapeQueues
    except gexc.GoogleAPICallError as exc:
        return type(exc).__name__


def test_the_proxy_forwards_the_iam_methods_as_the_emulator_answers_them(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    topic = f"projects/{deployment.project}/topics/{deployment.work_topic}"
    direct = _iam_answer(pubsub_v1.PublisherClient(), topic)
    fault_proxies(FaultPlan(0.0))  # clients made from here on go through the proxy
    assert _iam_answer(pubsub_v1.PublisherClient(), topic) == direct == "MethodNotImplemented"


def test_shape_queues_retry_transient_pubsub_answers(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    # Seed 7 fails the first three GetIamPolicy calls (and others) with DEADLINE_EXCEEDED.
    plan = FaultPlan(0.5, seed=7, kinds=["DEADLINE_EXCEEDED"])
    fault_proxies(plan)
    queues = ShapeQueues(
        project=deployment.project,
        work_topic=deployment.work_topic,
        work_subscription=deployment.work_subscription,
    )
    try:
        made = queues.ensure("abc123")
        assert queues.exists("abc123") and made.subscription.endswith("-abc123")
    finally:
        queues.close()
    assert plan.injected[("pubsub:GetIamPolicy", "DEADLINE_EXCEEDED")] >= 1


def test_only_a_permission_denied_names_a_role() -> None:
    denied = _failed("could not give s the grants of w", gexc.PermissionDenied("denied"))
    assert "roles/pubsub.admin" in str(denied)
    for transient in (gexc.DeadlineExceeded("Deadline Exceeded"), gexc.ServiceUnavailable("x")):
        line = str(_failed("could not give s the grants of w", transient))
        assert "roles/" not in line and "kept answering" in line
    invalid = str(_failed("could not create work topic t", gexc.InvalidArgument("bad name")))
    assert "roles/" not in invalid and "bad name" in invalid
