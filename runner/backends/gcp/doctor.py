"""``runner doctor``: is the deployment a user points at complete and reachable?

Checks, in order: credentials, the APIs the stack uses, the bucket, the work and events topics,
the work, events and dead-letter subscriptions (and that each is attached where it should be),
Pub/Sub's service agent's grants, the instance group, the region's quotas against it (how many
VMs fit, what to ask for 125 and 2,000), its VMs, the GPU and container images, and the machine
shapes asked for (:mod:`runner.backends.gcp.prerequisites`). Every check says what it found or
exactly what is missing and how to fix it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import google.auth
import google.auth.exceptions
import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from runner.backends.gcp.deployment import DEFAULT_WORKERS
from runner.backends.gcp.fleet import GceFleet
from runner.backends.gcp.prerequisites import (
    check_apis,
    check_images,
    check_pubsub_agent,
    check_shapes,
)
from runner.backends.gcp.quota import fit, read_region, read_template
from runner.config import Config
from runner.engine.deployment import Check
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.backends.gcp.pubsub_api import resource_path
from worker.backends.gcp.vm import COMPUTE_ENDPOINT_ENV
from worker.errors import CFlowError

CHECK_TIMEOUT = 15.0  # seconds per API call
FIX = "run `cdktf deploy` (infra/) or correct the name in the deployment outputs"


def _api_error(what: str, exc: Exception) -> str:
    if isinstance(exc, gexc.NotFound):
        return f"{what} does not exist; {FIX}"
    if isinstance(exc, gexc.PermissionDenied | gexc.Forbidden | gexc.Unauthenticated):
        return f"{what} is not readable with these credentials; grant them access or switch account"
    if isinstance(exc, CFlowError):
        return str(exc)
    message = getattr(exc, "message", None) or str(exc)
    return f"{what} could not be reached: {message.splitlines()[0] if message else exc}"


def check_credentials() -> Check:
    emulated = [
        f"{name}={os.environ[name]}"
        for name in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", COMPUTE_ENDPOINT_ENV)
        if os.environ.get(name)
    ]
    if len(emulated) == 3 and all("127.0.0.1" in e or "localhost" in e for e in emulated):
        return Check("credentials", True, "emulators only: " + ", ".join(emulated))
    try:
        credentials, project = google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError:
        return Check(
            "credentials",
            False,
            "no Application Default Credentials; run `gcloud auth application-default login`",
        )
    who = getattr(credentials, "service_account_email", None) or getattr(
        credentials, "account", None
    )
    detail = "Application Default Credentials" + (f" ({who})" if who else "")
    if project:
        detail += f", default project {project}"
    return Check("credentials", True, detail)


def check_bucket(config: Config) -> Check:
    name = f"bucket gs://{config.bucket}"
    try:
        client = make_client(config.project)
        bucket = client.get_bucket(config.bucket, timeout=CHECK_TIMEOUT)
    except Exception as exc:
        return Check("bucket", False, _api_error(name, exc))
    return Check("bucket", True, f"{name} ({bucket.location or 'location unknown'})")


def check_messaging(config: Config) -> list[Check]:
    """Topics and subscriptions, and how the subscriptions are wired to the topics."""
    assert config.project
    project = config.project
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    checks: list[Check] = []
    try:
        for label, name in (
            ("work topic", config.work_topic),
            ("events topic", config.events_topic),
        ):
            path = resource_path(project, "topics", name or "")
            try:
                publisher.get_topic(topic=path, timeout=CHECK_TIMEOUT)
            except Exception as exc:
                checks.append(Check(label, False, _api_error(f"{label} {path}", exc)))
            else:
                checks.append(Check(label, True, path))
        work_topic = resource_path(project, "topics", config.work_topic or "")
        events_topic = resource_path(project, "topics", config.events_topic or "")
        dead_topic: str | None = None
        for label, name, topic in (
            ("work subscription", config.work_subscription, work_topic),
            ("events subscription", config.events_subscription, events_topic),
            ("dead-letter subscription", config.dead_letter_subscription, None),
        ):
            path = resource_path(project, "subscriptions", name or "")
            try:
                sub = subscriber.get_subscription(subscription=path, timeout=CHECK_TIMEOUT)
            except Exception as exc:
                checks.append(Check(label, False, _api_error(f"{label} {path}", exc)))
                continue
            expected = topic if topic is not None else dead_topic
            if expected is not None and sub.topic != expected:
                checks.append(
                    Check(label, False, f"{path} is attached to {sub.topic}, not {expected}; {FIX}")
                )
                continue
            detail = f"{path} (ack deadline {sub.ack_deadline_seconds}s)"
            if label == "work subscription":
                policy = sub.dead_letter_policy
                if not policy.dead_letter_topic:
                    checks.append(Check(label, False, f"{path} has no dead-letter policy; {FIX}"))
                    continue
                dead_topic = policy.dead_letter_topic
                attempts = policy.max_delivery_attempts
                detail += f", dead letters to {dead_topic} after {attempts} deliveries"
            checks.append(Check(label, True, detail))
    finally:
        publisher.stop()
        subscriber.close()
    return checks


def check_group(config: Config) -> Check:
    assert config.project and config.group
    try:
        fleet = GceFleet(
            project=config.project, group=config.group, zone=config.zone, region=config.region
        )
        try:
            if not fleet.exists():
                return Check("instance group", False, f"{fleet.describe} does not exist; {FIX}")
            size = fleet.target_size()
        finally:
            fleet.close()
    except Exception as exc:
        return Check("instance group", False, _api_error(f"instance group {config.group}", exc))
    return Check("instance group", True, f"{fleet.describe}, target size {size}")


def check_quota(config: Config, *, workers: int = DEFAULT_WORKERS) -> Check:
    """Whether the region's quotas fit the group's size (at least ``workers`` VMs)."""
    assert config.project and config.group
    region = config.region or (config.zone or "").rsplit("-", 1)[0]
    try:
        fleet = GceFleet(
            project=config.project, group=config.group, zone=config.zone, region=config.region
        )
        try:
            manager = fleet._call("read", "get")
        finally:
            fleet.close()
        quotas, zones = read_region(config.project, region)
        zone = config.zone or (zones[0] if zones else f"{region}-a")
        template = read_template(config.project, manager.instance_template, zone)
    except Exception as exc:
        return Check("quota", False, _api_error(f"the quotas of region {region}", exc))
    found = fit(quotas, template)
    wanted = max(int(manager.target_size), workers)
    line = found.line(region, template)
    if found.vms < wanted:
        return Check("quota", False, f"only {line}; raise it in IAM & Admin > Quotas")
    return Check("quota", True, line)


def check_vms(config: Config) -> Check:
    """VMs of the group that cannot start (quota) or reported a failed boot or self-removal."""
    assert config.project and config.group and config.bucket
    try:
        fleet = GceFleet(
            project=config.project,
            group=config.group,
            zone=config.zone,
            region=config.region,
            store=GcsStore(config.bucket, client=make_client(config.project)),
        )
        try:
            instances = fleet.instances()
            problems = fleet.problems()
        finally:
            fleet.close()
    except Exception as exc:
        return Check("VMs", False, _api_error(f"the VMs of group {config.group}", exc))
    if problems:
        fix = "`runner watch RUN` deletes VMs that reported a problem, or `runner cancel RUN`"
        return Check("VMs", False, "; ".join(problems) + f"; {fix}")
    return Check("VMs", True, f"{len(instances)} in the group, none reported a problem")


def run_checks(
    config: Config,
    *,
    on_check: Callable[[Check], None] | None = None,
    options: Any | None = None,
) -> list[Check]:
    """Every check of the deployment, reported to ``on_check`` as it completes; ``options``
    (:class:`worker.protocol.RunOptions`) adds the machine shapes they ask for."""
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        if on_check is not None:
            on_check(check)

    credentials = check_credentials()
    add(credentials)
    if not credentials.ok:  # every other check would fail the same way
        return checks
    add(check_apis(config, emulated=credentials.detail.startswith("emulators only")))
    add(check_bucket(config))
    for check in check_messaging(config):
        add(check)
    add(check_agent(config))
    group = check_group(config)
    add(group)
    if group.ok:
        add(check_quota(config))
        add(check_vms(config))
        for check in check_images(config):
            add(check)
        if options is not None:
            for check in check_shapes(config, options):
                add(check)
    return checks


def check_agent(config: Config) -> Check:
    """Pub/Sub's service agent's grants (:func:`check_pubsub_agent`)."""
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    try:
        return check_pubsub_agent(config, publisher=publisher, subscriber=subscriber)
    except Exception as exc:
        return Check("Pub/Sub service agent", False, _api_error("the work subscription", exc))
    finally:
        publisher.stop()
        subscriber.close()
