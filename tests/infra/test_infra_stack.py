"""The synthesized stack: every resource the issue asks for, with its key properties.

Assertions go by resource type and properties, never by cdktf's generated logical ids.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Plain values only: every test process collects this module, none should load CDKTF for it.
from infra.contract import (
    DEFAULT_ACTION_ON_FAILURE,
    LEAVE_GROUP_PERMISSIONS,
    REQUIRED_APIS,
    STACK_ENABLED_APIS,
)

if TYPE_CHECKING:
    from conftest import Synth

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.infra

OUTPUTS = {
    "project",
    "region",
    "zone",
    "bucket",
    "work_topic",
    "work_subscription",
    "events_topic",
    "events_subscription",
    "dead_letter_topic",
    "dead_letter_subscription",
    "group",
    "group_scope",
    "worker_service_account",
    "image_repository",
    "gpu_image",
    "container_image",
    "worker_python",
}
VARIABLE_DEFAULTS = {
    "region": "us-central1",
    "zone": "",
    "zones": [],
    "name_prefix": "cflow",
    "bucket_name": "",
    "machine_type": "e2-standard-2",
    "disk_size_gb": 20,
    "shard_count": 0,
    "slots": 1,
    "spot": True,
    "image_family": "debian-12",
    "image_project": "debian-cloud",
    "idle_timeout": 300,
    "max_vm_hours": 24,
    "retention_days": 30,
    "max_delivery_attempts": 20,
    "input_buckets": [],
    "gpu_image": "",
    "container_image": "",
}
WORKER_METADATA = {
    "cflow-project",
    "cflow-region",
    "cflow-zone",
    "cflow-group",
    "cflow-bucket",
    "cflow-work-topic",
    "cflow-subscription",
    "cflow-events-topic",
    "cflow-slots",
    "cflow-idle-timeout",
    "cflow-max-vm-hours",
    "cflow-worker-package",
    "cflow-worker-sha256",
    "cflow-wheelhouse",
    "cflow-wheelhouse-sha256",
}


def test_variables_have_defaults_except_project(synth: Synth) -> None:
    variables = synth.tf["variable"]
    assert "default" not in variables["project"]  # no sensible default: must be given
    assert {
        k: v.get("default") for k, v in variables.items() if k != "project"
    } == VARIABLE_DEFAULTS
    assert all(v.get("description") for v in variables.values())


def test_bucket_keeps_no_soft_deleted_objects(synth: Synth) -> None:
    (bucket,) = synth.resources("google_storage_bucket")
    assert bucket["soft_delete_policy"] == {"retention_duration_seconds": 0}


def test_the_stack_enables_artifact_registry_before_its_repository(synth: Synth) -> None:
    services = synth.resources("google_project_service")
    assert [s["service"] for s in services] == ["artifactregistry.googleapis.com"]
    assert set(STACK_ENABLED_APIS) <= set(REQUIRED_APIS)
    (service,) = services
    assert (service["disable_on_destroy"], service["project"]) == (False, "${var.project}")
    (repository,) = synth.resources("google_artifact_registry_repository")
    api = synth.ref("google_project_service", "id", service="artifactregistry.googleapis.com")
    assert repository["depends_on"] == [api.removeprefix("${").removesuffix(".id}")]


def test_groups_leave_a_vm_that_stopped_itself_stopped(synth: Synth) -> None:
    # Compute's default, REPAIR, recreates a VM that powered itself off: a VM that cannot leave
    # would boot, idle and power off for ever. Both groups say DO_NOTHING.
    assert DEFAULT_ACTION_ON_FAILURE == "DO_NOTHING"
    for type_ in (
        "google_compute_instance_group_manager",
        "google_compute_region_instance_group_manager",
    ):
        (group,) = synth.resources(type_)
        assert group["instance_lifecycle_policy"] == {"default_action_on_failure": "DO_NOTHING"}


def test_bucket_is_private_uniform_expiring_and_destroyable(synth: Synth) -> None:
    (bucket,) = synth.resources("google_storage_bucket")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["force_destroy"] is True
    assert bucket["location"] == "${var.region}"
    expiry = [r for r in bucket["lifecycle_rule"] if r["action"]["type"] == "Delete"]
    assert expiry == [
        {
            "action": {"type": "Delete"},
            "condition": {"age": "${var.retention_days}", "matches_prefix": ["runs/"]},
        }
    ]


def test_work_subscription_retries_with_backoff_and_dead_letters(synth: Synth) -> None:
    dead_letter_topic = synth.ref(
        "google_pubsub_topic", "id", name="${var.name_prefix}-dead-letter"
    )
    work_topic = synth.ref("google_pubsub_topic", "id", name="${var.name_prefix}-work")
    work = synth.resource("google_pubsub_subscription", topic=work_topic)
    assert work["name"] == "${var.name_prefix}-work"
    assert work["ack_deadline_seconds"] >= 10
    assert work["retry_policy"] == {"minimum_backoff": "10s", "maximum_backoff": "300s"}
    assert work["dead_letter_policy"] == {
        "dead_letter_topic": dead_letter_topic,
        "max_delivery_attempts": "${var.max_delivery_attempts}",
    }
    # Dead letters are kept on their own subscription, not dropped.
    synth.resource("google_pubsub_subscription", topic=dead_letter_topic)


def test_events_subscription_for_the_runner(synth: Synth) -> None:
    events_topic = synth.ref("google_pubsub_topic", "id", name="${var.name_prefix}-events")
    events = synth.resource("google_pubsub_subscription", topic=events_topic)
    assert events["name"] == "${var.name_prefix}-events"
    assert "dead_letter_policy" not in events
    # Read by nobody on Google Cloud (each run's watcher has its own): Pub/Sub's minimum
    # retention keeps its unread backlog to ten minutes.
    assert events["message_retention_duration"] == "600s"


def test_queued_shards_wait_pubsubs_longest_retention(synth: Synth) -> None:
    work = synth.resource("google_pubsub_subscription", name="${var.name_prefix}-work")
    assert work["message_retention_duration"] == f"{31 * 86400}s"


def test_subscriptions_never_expire(synth: Synth) -> None:
    subscriptions = synth.resources("google_pubsub_subscription")
    assert len(subscriptions) == 3
    assert all(s["expiration_policy"] == {"ttl": ""} for s in subscriptions)


def test_pubsub_service_agent_is_declared_and_can_dead_letter(synth: Synth) -> None:
    # The agent may not exist yet on a fresh project: declared, so the bindings never name a
    # missing account.
    (identity,) = synth.resources("google_project_service_identity")
    assert identity == {
        "project": "${var.project}",
        "service": "pubsub.googleapis.com",
        "provider": "google-beta",
    }
    assert synth.tf["terraform"]["required_providers"]["google-beta"]["source"] == (
        "hashicorp/google-beta"
    )
    versions = {p["version"] for p in synth.tf["terraform"]["required_providers"].values()}
    assert len(versions) == 1, "google and google-beta from the same release"
    email = synth.ref("google_project_service_identity", "email", service="pubsub.googleapis.com")
    agent = f"serviceAccount:{email}"
    dead_letter = synth.ref("google_pubsub_topic", "name", name="${var.name_prefix}-dead-letter")
    work_sub = synth.ref("google_pubsub_subscription", "name", name="${var.name_prefix}-work")
    topic_grants = [
        g for g in synth.resources("google_pubsub_topic_iam_member") if g["member"] == agent
    ]
    sub_grants = [
        g for g in synth.resources("google_pubsub_subscription_iam_member") if g["member"] == agent
    ]
    assert topic_grants == [
        {"topic": dead_letter, "role": "roles/pubsub.publisher", "member": agent}
    ]
    assert sub_grants == [
        {"subscription": work_sub, "role": "roles/pubsub.subscriber", "member": agent}
    ]


def _worker_grants(synth: Synth) -> list[tuple[str, str, str]]:
    member = synth.ref("google_service_account", "member", account_id="${var.name_prefix}-worker")
    grants = []
    for type_, target_key in [
        ("google_storage_bucket_iam_member", "bucket"),
        ("google_pubsub_subscription_iam_member", "subscription"),
        ("google_pubsub_topic_iam_member", "topic"),
        ("google_project_iam_member", "project"),
    ]:
        for grant in synth.resources(type_):
            if grant["member"] == member:
                grants.append((type_, grant[target_key], grant["role"]))
    return grants


def test_worker_rights_are_granted_on_the_resources(synth: Synth) -> None:
    bucket = synth.ref("google_storage_bucket", "name", force_destroy=True)
    work_sub = synth.ref("google_pubsub_subscription", "name", name="${var.name_prefix}-work")
    events = synth.ref("google_pubsub_topic", "name", name="${var.name_prefix}-events")
    work = synth.ref("google_pubsub_topic", "name", name="${var.name_prefix}-work")
    leave = _role(synth, LEAVE_GROUP_PERMISSIONS)
    assert sorted(_worker_grants(synth)) == sorted(
        [
            ("google_storage_bucket_iam_member", bucket, "roles/storage.objectUser"),
            ("google_storage_bucket_iam_member", "${each.value}", "roles/storage.objectViewer"),
            ("google_pubsub_subscription_iam_member", work_sub, "roles/pubsub.subscriber"),
            ("google_pubsub_subscription_iam_member", work_sub, "roles/pubsub.viewer"),
            ("google_pubsub_topic_iam_member", work, "roles/pubsub.publisher"),
            ("google_pubsub_topic_iam_member", events, "roles/pubsub.publisher"),
            ("google_project_iam_member", "${var.project}", "roles/logging.logWriter"),
            ("google_project_iam_member", "${var.project}", leave),
        ]
    )
    input_grant = synth.resource(
        "google_storage_bucket_iam_member", role="roles/storage.objectViewer"
    )
    assert input_grant["for_each"] == "${toset(var.input_buckets)}"


def _role(synth: Synth, permissions: list[str]) -> str:
    for logical_id, body in synth.tf["resource"]["google_project_iam_custom_role"].items():
        if sorted(body["permissions"]) == sorted(permissions):
            return f"${{google_project_iam_custom_role.{logical_id}.name}}"
    raise AssertionError(f"no custom role with {permissions}")


def test_self_removal_needs_the_group_right_alone_without_conditions(synth: Synth) -> None:
    # IAM Conditions do not recognize InstanceGroupManager resources: a condition on the group
    # would never match. deleteInstances asks the caller for compute.instanceGroupManagers.update
    # only (the group deletes the VM as itself): no right on instances is granted at all.
    assert sorted(LEAVE_GROUP_PERMISSIONS) == [
        "compute.instanceGroupManagers.get",
        "compute.instanceGroupManagers.update",
    ]
    leave = synth.resource("google_project_iam_member", role=_role(synth, LEAVE_GROUP_PERMISSIONS))
    assert "condition" not in leave
    (role,) = synth.resources("google_project_iam_custom_role")
    assert sorted(role["permissions"]) == sorted(LEAVE_GROUP_PERMISSIONS)
    assert "compute.instances.delete" not in json.dumps(synth.tf["resource"])


def test_no_keys_no_primitive_roles_no_authoritative_policies(synth: Synth) -> None:
    resource_types = set(synth.tf["resource"])
    assert "google_service_account_key" not in resource_types
    assert not resource_types & {
        "google_project_iam_policy",
        "google_project_iam_binding",
        "google_storage_bucket_iam_policy",
        "google_pubsub_topic_iam_policy",
        "google_pubsub_subscription_iam_policy",
    }
    text = json.dumps(synth.tf["resource"])
    assert not re.search(r"roles/(owner|editor)\b", text)
    # Project-level grants: log writing and leaving the group, nothing else.
    leave = _role(synth, LEAVE_GROUP_PERMISSIONS)
    for grant in synth.resources("google_project_iam_member"):
        assert grant["role"] in ("roles/logging.logWriter", leave)


def test_image_is_pinned_through_a_data_source(synth: Synth) -> None:
    ((image_id, image),) = synth.tf["data"]["google_compute_image"].items()
    assert image["family"] == "${var.image_family}"
    assert image["project"] == "${var.image_project}"
    (template,) = synth.resources("google_compute_instance_template")
    (disk,) = template["disk"]
    assert disk["source_image"] == f"${{data.google_compute_image.{image_id}.self_link}}"
    assert disk["boot"] is True and disk["auto_delete"] is True
    assert disk["disk_size_gb"] == "${var.disk_size_gb}"


def test_template_is_spot_shielded_private_and_runs_as_the_worker(synth: Synth) -> None:
    (template,) = synth.resources("google_compute_instance_template")
    assert template["scheduling"] == {
        "provisioning_model": '${var.spot ? "SPOT" : "STANDARD"}',
        "preemptible": "${var.spot}",
        "automatic_restart": "${!var.spot}",
        "on_host_maintenance": '${var.spot ? "TERMINATE" : "MIGRATE"}',
        "instance_termination_action": '${var.spot ? "DELETE" : null}',
    }
    assert template["shielded_instance_config"] == {
        "enable_secure_boot": True,
        "enable_vtpm": True,
        "enable_integrity_monitoring": True,
    }
    (nic,) = template["network_interface"]
    assert "access_config" not in nic  # no external IP
    assert nic["subnetwork"] == synth.ref(
        "google_compute_subnetwork", "id", private_ip_google_access=True
    )
    assert template["service_account"]["email"] == synth.ref(
        "google_service_account", "email", account_id="${var.name_prefix}-worker"
    )
    assert template["lifecycle"] == {"create_before_destroy": True}
    assert template["machine_type"] == "${var.machine_type}"


def test_template_metadata_carries_config_and_scripts(synth: Synth) -> None:
    (template,) = synth.resources("google_compute_instance_template")
    metadata = template["metadata"]
    assert set(metadata) >= WORKER_METADATA
    assert metadata["startup-script"] == (REPO / "infra/scripts/startup.sh").read_text()
    assert metadata["shutdown-script"] == (REPO / "infra/scripts/shutdown.sh").read_text()
    assert metadata["cflow-leave-script"] == (REPO / "infra/scripts/leave.sh").read_text()
    assert metadata["block-project-ssh-keys"] == "true"
    assert metadata["enable-oslogin"] == "TRUE"
    assert metadata["cflow-subscription"] == synth.ref(
        "google_pubsub_subscription", "name", name="${var.name_prefix}-work"
    )
    assert metadata["cflow-events-topic"] == synth.ref(
        "google_pubsub_topic", "name", name="${var.name_prefix}-events"
    )
    assert metadata["cflow-group"] == "${var.name_prefix}-workers"
    assert metadata["cflow-zone"] == "${var.zone}"


def test_worker_package_is_content_addressed(synth: Synth) -> None:
    (obj,) = [
        o for o in synth.resources("google_storage_bucket_object") if o["name"].endswith(".whl")
    ]
    wheel = synth.stack_dir / obj["source"]
    sha256 = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert obj["name"] == f"worker/{sha256}/{wheel.name}"
    assert re.fullmatch(r"cflow_worker-[0-9.]+\+[0-9a-f]{12}-py3-none-any\.whl", wheel.name)
    (template,) = synth.resources("google_compute_instance_template")
    assert template["metadata"]["cflow-worker-sha256"] == sha256
    bucket = synth.ref("google_storage_bucket", "name", force_destroy=True)
    object_name = synth.ref("google_storage_bucket_object", "name", source=obj["source"])
    assert template["metadata"]["cflow-worker-package"] == f"gs://{bucket}/{object_name}"


def test_worker_dependencies_ship_as_a_content_addressed_wheelhouse(synth: Synth) -> None:
    (obj,) = [
        o for o in synth.resources("google_storage_bucket_object") if o["name"].endswith(".tar")
    ]
    house = synth.stack_dir / obj["source"]
    sha256 = hashlib.sha256(house.read_bytes()).hexdigest()
    assert obj["name"] == f"worker/{sha256}/{house.name}"
    (template,) = synth.resources("google_compute_instance_template")
    assert template["metadata"]["cflow-wheelhouse-sha256"] == sha256
    with tarfile.open(house) as tar:
        names = [m.name.removeprefix("wheels/") for m in tar.getmembers()]
    assert any(n.startswith("google_cloud_pubsub-") for n in names)
    assert all(n.endswith(".whl") for n in names)


def _groups(synth: Synth) -> tuple[dict[str, Any], dict[str, Any]]:
    (zonal,) = synth.resources("google_compute_instance_group_manager")
    (regional,) = synth.resources("google_compute_region_instance_group_manager")
    return zonal, regional


def test_one_group_zonal_or_regional_sized_by_shards_then_owned_by_the_runner(synth: Synth) -> None:
    template = synth.ref(
        "google_compute_instance_template", "self_link_unique", machine_type="${var.machine_type}"
    )
    zonal, regional = _groups(synth)
    assert zonal["count"] == "${(length(var.zone) >= 1) ? 1 : 0}"
    assert regional["count"] == "${(length(var.zone) >= 1) ? 0 : 1}"
    for group in (zonal, regional):
        assert group["name"] == "${var.name_prefix}-workers"
        assert group["base_instance_name"] == "${var.name_prefix}-worker"
        assert group["target_size"] == "${var.shard_count}"
        assert group["lifecycle"]["ignore_changes"] == ["target_size"]
        assert [v["instance_template"] for v in group["version"]] == [template]
        assert group["update_policy"]["type"] == "OPPORTUNISTIC"  # never replaces busy VMs
        assert group["wait_for_instances"] is False
    assert zonal["zone"] == "${var.zone}"
    assert regional["region"] == "${var.region}"
    # Empty zones: every zone of the region that is up (a regional group left to itself would
    # use three).
    ((zones_id, zones),) = synth.tf["data"]["google_compute_zones"].items()
    assert (zones["region"], zones["status"]) == ("${var.region}", "UP")
    assert regional["distribution_policy_zones"] == (
        f"${{(length(var.zones) >= 1) ? var.zones : data.google_compute_zones.{zones_id}.names}}"
    )
    assert regional["update_policy"]["instance_redistribution_type"] == "NONE"


def test_group_size_limits_are_refused_at_deploy(synth: Synth) -> None:
    zonal, regional = _groups(synth)
    (zonal_limit,) = zonal["lifecycle"]["precondition"]
    (regional_limit,) = regional["lifecycle"]["precondition"]
    assert zonal_limit["condition"] == "${(var.shard_count <= 1000)}"
    assert regional_limit["condition"] == "${(var.shard_count <= 2000)}"
    assert "zonal instance group holds (1000)" in zonal_limit["error_message"]


def test_network_has_no_inbound_access_and_egress_through_nat(synth: Synth) -> None:
    (network,) = synth.resources("google_compute_network")
    assert network["auto_create_subnetworks"] is False
    (subnet,) = synth.resources("google_compute_subnetwork")
    assert subnet["private_ip_google_access"] is True
    firewalls = synth.resources("google_compute_firewall")
    assert all("allow" not in rule for rule in firewalls)
    assert [r["direction"] for r in firewalls] == ["INGRESS"]
    (nat,) = synth.resources("google_compute_router_nat")
    assert nat["source_subnetwork_ip_ranges_to_nat"] == "ALL_SUBNETWORKS_ALL_IP_RANGES"


def test_outputs_are_the_runner_contract(synth: Synth) -> None:
    outputs = synth.tf["output"]
    assert set(outputs) == OUTPUTS
    assert synth.tf["//"]["outputs"] == {"cflow": {name: name for name in OUTPUTS}}
    # Names, not paths: no `.id` or self links, which carry projects/... prefixes.
    assert not [n for n, o in outputs.items() if re.search(r"\.(id|self_link)\}", o["value"])]
    assert outputs["zone"]["value"] == "${var.zone}"
    assert outputs["group_scope"]["value"] == '${(length(var.zone) >= 1) ? "zonal" : "regional"}'
    assert outputs["worker_service_account"]["value"].endswith(".email}")
    assert (
        outputs["gpu_image"]["value"] == "${var.gpu_image}"
    )  # runner.backends.gcp.shapes.groups reads it
    assert outputs["container_image"]["value"] == "${var.container_image}"  # and this one


def test_cdktf_json_runs_the_app_with_the_prebuilt_provider() -> None:
    config = json.loads(Path(REPO / "cdktf.json").read_text())
    assert config["language"] == "python"
    assert config["app"] == "python3 infra/main.py"
    assert config["terraformProviders"] == []
