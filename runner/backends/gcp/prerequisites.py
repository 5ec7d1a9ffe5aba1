"""``runner doctor``'s checks of what Google Cloud refuses only late, mid-deploy or mid-run.

- the APIs the stack and the runner use are enabled (Service Usage ``services:batchGet``; the
  list is the stack's own, :data:`infra.contract.REQUIRED_APIS`): a disabled one fails a deploy
  halfway, or every call of a run with 403 ``SERVICE_DISABLED``;
- the GPU image (the deployment's ``gpu_image``, or the default Deep Learning VM family) and the
  ``container_image`` resolve, and how large a boot disk they need: a family that moved on fails
  every GPU VM's creation inside its group, where nobody sees it;
- the machine shapes asked for (the same flags as ``submit``) fit the region's per-series CPU,
  GPU and disk quotas (:class:`runner.backends.gcp.shapes.groups.Shapes.check`);
- Pub/Sub's service agent may publish to the dead-letter topic and pull the work subscription
  (``getIamPolicy``): without those grants a shard that keeps crashing its worker is never
  dead-lettered, it is redelivered for ever.

Each check is one line: what it found, or what to fix.
"""

from __future__ import annotations

import os
from typing import Any

from google.api_core import exceptions as gexc

from infra.contract import REQUIRED_APIS
from runner.config import Config
from runner.engine.deployment import Check
from worker.backends.gcp.pubsub_api import resource_path

SERVICE_USAGE = "https://serviceusage.googleapis.com"
SERVICE_USAGE_ENDPOINT_ENV = "CFLOW_SERVICE_USAGE_ENDPOINT"  # a test's fake Service Usage API
BATCH_GET_LIMIT = 20  # services per services:batchGet request (the API takes at most 30)
TIMEOUT = 15.0  # seconds per call
PUBSUB_AGENT = "@gcp-sa-pubsub.iam.gserviceaccount.com"  # service-<project number>@...
# Roles that hold pubsub.topics.publish / pubsub.subscriptions.consume.
PUBLISHERS = {"roles/pubsub.publisher", "roles/pubsub.editor", "roles/pubsub.admin"}
SUBSCRIBERS = {"roles/pubsub.subscriber", "roles/pubsub.editor", "roles/pubsub.admin"}


def _session() -> tuple[Any, str]:
    """An authorized HTTP session for Service Usage, and its endpoint."""
    from google.auth.transport.requests import AuthorizedSession

    endpoint = os.environ.get(SERVICE_USAGE_ENDPOINT_ENV)
    if endpoint and endpoint.startswith("http://"):
        from google.auth.credentials import AnonymousCredentials

        return AuthorizedSession(AnonymousCredentials()), endpoint
    import google.auth

    scopes = ["https://www.googleapis.com/auth/cloud-platform"]
    credentials, _ = google.auth.default(scopes=scopes)
    return AuthorizedSession(credentials), endpoint or SERVICE_USAGE


def check_apis(
    config: Config, apis: tuple[str, ...] = REQUIRED_APIS, *, emulated: bool = False
) -> Check:
    """Every API of ``apis`` enabled in the deployment's project (``emulated``: the deployment
    is emulators, which have no APIs to enable, unless a Service Usage endpoint is set)."""
    project = str(config.project)
    if emulated and not os.environ.get(SERVICE_USAGE_ENDPOINT_ENV):
        return Check("APIs", True, "not checkable here: emulators only")
    try:
        session, endpoint = _session()
        states: dict[str, str] = {}
        for start in range(0, len(apis), BATCH_GET_LIMIT):
            names = [
                f"projects/{project}/services/{a}" for a in apis[start : start + BATCH_GET_LIMIT]
            ]
            answer = session.get(
                f"{endpoint}/v1/projects/{project}/services:batchGet",
                params=[("names", n) for n in names],
                timeout=TIMEOUT,
            )
            body = answer.json() if answer.content else {}
            if answer.status_code != 200:
                message = (body.get("error") or {}).get("message") or answer.reason
                return Check(
                    "APIs",
                    False,
                    f"could not read the project's enabled APIs ({answer.status_code}: {message});"
                    f" enable serviceusage.googleapis.com and grant serviceusage.services.get",
                )
            for service in body.get("services", []):
                states[str(service["name"]).rsplit("/", 1)[-1]] = str(service.get("state"))
    except Exception as exc:  # no credentials, no network: one line
        return Check("APIs", False, f"could not reach Service Usage: {exc}")
    off = [a for a in apis if states.get(a) != "ENABLED"]
    if off:
        return Check(
            "APIs",
            False,
            f"not enabled in {project}: {', '.join(off)}; run `gcloud services enable "
            f"{' '.join(off)} --project {project}`",
        )
    return Check("APIs", True, f"{len(apis)} enabled: {', '.join(a.split('.')[0] for a in apis)}")


def check_images(config: Config) -> list[Check]:
    """The GPU image (and the container image, if set) resolve; the disk they need."""
    from runner.backends.gcp.shapes.groups import DEFAULT_GPU_IMAGE, Shapes
    from runner.backends.gcp.shapes.model import ShapeError

    assert config.project and config.group
    wanted = [("GPU image", config.gpu_image or DEFAULT_GPU_IMAGE, "gpu")]
    if config.container_image:
        wanted.append(("container image", config.container_image, "engine"))
    checks = []
    shapes = Shapes(
        project=config.project, group=config.group, zone=config.zone, region=config.region
    )
    try:
        for name, image, kind in wanted:
            try:
                gb = shapes.images.disk_gb(image, kind)  # refused with the setting to change
                found = shapes.images.describe(image)
            except ShapeError as refused:
                checks.append(Check(name, False, str(refused)))
                continue
            detail = f"{image} is {found.get('name')}, {gb} GB: its VMs get boot disks of {gb} GB"
            checks.append(Check(name, True, detail + " or more"))
    finally:
        shapes.close()
    return checks


def check_shapes(config: Config, options: Any) -> list[Check]:
    """The run options' shapes (``submit``'s flags) against the region's zones and quotas."""
    from runner.backends.gcp.shapes.groups import Shapes
    from runner.backends.gcp.shapes.model import ShapedGroup, ShapeError, run_shapes
    from worker.errors import CFlowError

    assert config.project and config.group
    try:
        asked = run_shapes(options)
    except CFlowError as bad:
        return [Check("machine shape", False, str(bad))]
    checks = []
    shapes = Shapes(
        project=config.project,
        group=config.group,
        zone=config.zone,
        region=config.region,
        gpu_image=config.gpu_image,
        container_image=config.container_image,
    )
    try:
        for shape in asked:
            try:
                sized, _, zones = shapes.check(shape)
            except ShapeError as refused:
                checks.append(Check("machine shape", False, str(refused)))
                continue
            machine_type = sized.machine_type or "the deployment's machine type"
            what = ShapedGroup("", "", sized, False, machine_type).describe
            checks.append(
                Check("machine shape", True, f"a VM of {what} fits, in {', '.join(zones)}")
            )
    finally:
        shapes.close()
    return checks


def check_pubsub_agent(
    config: Config, *, publisher: Any, subscriber: Any, iam: tuple[Any, Any] | None = None
) -> Check:
    """Pub/Sub's service agent may publish dead letters and take them from the work
    subscription (the grants a dead-letter policy needs). ``iam``: the (publisher, subscriber)
    clients whose ``get_iam_policy`` to ask, if not these."""
    project = str(config.project)
    name = "Pub/Sub service agent"
    work = resource_path(project, "subscriptions", config.work_subscription or "")
    try:
        sub = subscriber.get_subscription(subscription=work, timeout=TIMEOUT)
        dead = sub.dead_letter_policy.dead_letter_topic
        if not dead:
            return Check(name, False, f"{work} has no dead-letter policy; run `cdktf deploy`")
        topics, subscriptions = iam or (publisher, subscriber)
        wanted = (
            (topics, dead, PUBLISHERS, "roles/pubsub.publisher"),
            (subscriptions, work, SUBSCRIBERS, "roles/pubsub.subscriber"),
        )
        missing = []
        for client, resource, roles, role in wanted:
            policy = client.get_iam_policy(request={"resource": resource}, timeout=TIMEOUT)
            agents = {
                m
                for b in policy.bindings
                if b.role in roles
                for m in b.members
                if PUBSUB_AGENT in m
            }
            if not agents:
                missing.append(f"{role} on {resource}")
    except gexc.MethodNotImplemented:
        return Check(name, True, "not checkable here: this Pub/Sub (an emulator) has no IAM")
    except gexc.GoogleAPICallError as exc:
        return Check(name, False, f"could not read the grants of {work}: {exc.message}")
    if missing:
        agent = f"service-PROJECT_NUMBER{PUBSUB_AGENT}"
        return Check(
            name,
            False,
            f"{agent} lacks {'; '.join(missing)}: a shard that keeps failing is never "
            "dead-lettered; run `cdktf deploy` (infra/messaging.py grants them)",
        )
    return Check(name, True, "may publish dead letters and pull the work subscription")
