"""The stack's inputs: Terraform variables with defaults, set with ``--var`` or ``TF_VAR_<name>``.

They live in an ``inputs`` construct (the stack's outputs take the plain ids ``project``,
``region``, ...) with their Terraform names overridden to exactly the names below, e.g.
``cdktf deploy --var project=my-project --var shard_count=125``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdktf import IResolvable, TerraformVariable, TerraformVariableValidationConfig
from constructs import Construct

from worker import defaults

DEFAULT_REGION = "us-central1"
DEFAULT_NAME_PREFIX = "cflow"
DEFAULT_MACHINE_TYPE = "e2-standard-2"
DEFAULT_DISK_SIZE_GB = 20  # GB; the Debian image needs 10, the rest is scratch for shards
DEFAULT_IMAGE_FAMILY = "debian-12"  # ships python3.11, which the worker requires
DEFAULT_IMAGE_PROJECT = "debian-cloud"
DEFAULT_RETENTION_DAYS = 30  # days before objects under runs/ are deleted
# Pub/Sub counts every delivery, preemption nacks included, so the safety net sits well above
# the task failure budget (defaults.MAX_ATTEMPTS), which the worker enforces itself.
DEFAULT_MAX_DELIVERY_ATTEMPTS = max(defaults.MAX_DELIVERIES, 20)


@dataclass(frozen=True)
class Inputs:
    """Token-valued handles on the variables, passed to the constructs."""

    project: str
    region: str
    zone: str  # empty: a regional group
    zones: list[str]  # a regional group's zones; empty: every zone of the region
    name_prefix: str
    bucket_name: str  # empty: "<project>-<name_prefix>"
    machine_type: str
    disk_size_gb: float
    shard_count: float
    slots: float
    spot: IResolvable
    image_family: str
    image_project: str
    idle_timeout: float
    retention_days: float
    max_delivery_attempts: float
    input_buckets: list[str]
    gpu_image: str  # empty: the runner's default for machine shapes with GPUs
    container_image: str  # empty: runs with --image are refused (Debian has no container engine)


def declare_inputs(scope: Construct) -> Inputs:
    """Declare every variable under ``scope`` and return handles on them."""
    inputs = Construct(scope, "inputs")

    def var(name: str, type_: str, description: str, **kw: object) -> TerraformVariable:
        variable = TerraformVariable(inputs, name, type=type_, description=description, **kw)  # type: ignore[arg-type]
        variable.override_logical_id(name)
        return variable

    project = var("project", "string", "Google Cloud project id to deploy into (required).")
    region = var(
        "region", "string", "Region of the bucket, subnet and group.", default=DEFAULT_REGION
    )
    zone = var(
        "zone",
        "string",
        "Zone for a zonal worker group; empty (the default) for a regional group, which finds "
        "Spot capacity in any zone of the region.",
        default="",
    )
    zones = var(
        "zones",
        "list(string)",
        "Zones a regional group may use; empty (the default) means every zone of the region.",
        default=[],
    )
    name_prefix = var(
        "name_prefix",
        "string",
        "Prefix of every resource name; use another one for a second deployment in one project.",
        default=DEFAULT_NAME_PREFIX,
        validation=[
            TerraformVariableValidationConfig(
                condition='${can(regex("^[a-z][a-z0-9-]{1,18}[a-z0-9]$", var.name_prefix))}',
                error_message="name_prefix must be 3-20 lowercase letters, digits or hyphens, "
                "starting with a letter and not ending with a hyphen.",
            )
        ],
    )
    bucket_name = var(
        "bucket_name",
        "string",
        "Bucket name (globally unique); empty (the default) means <project>-<name_prefix>.",
        default="",
    )
    machine_type = var(
        "machine_type", "string", "Machine type of the worker VMs.", default=DEFAULT_MACHINE_TYPE
    )
    disk_size_gb = var(
        "disk_size_gb", "number", "Boot disk size of each VM, in GB.", default=DEFAULT_DISK_SIZE_GB
    )
    shard_count = var(
        "shard_count",
        "number",
        "The group's initial size. After creation the runner owns the size; later deploys "
        "do not change it.",
        default=0,
    )
    slots = var("slots", "number", "Shards each worker VM runs at once.", default=defaults.SLOTS)
    spot = var("spot", "bool", "Spot VMs (true) or standard VMs (false).", default=True)
    image_family = var(
        "image_family",
        "string",
        "Image family; resolved to one image at deploy time, so every VM boots the same image.",
        default=DEFAULT_IMAGE_FAMILY,
    )
    image_project = var(
        "image_project", "string", "Project of the image family.", default=DEFAULT_IMAGE_PROJECT
    )
    idle_timeout = var(
        "idle_timeout",
        "number",
        "Seconds a worker waits idle before it removes its own VM from the group.",
        default=int(defaults.IDLE_TIMEOUT),
    )
    retention_days = var(
        "retention_days",
        "number",
        "Days after which objects under runs/ in the bucket are deleted.",
        default=DEFAULT_RETENTION_DAYS,
    )
    max_delivery_attempts = var(
        "max_delivery_attempts",
        "number",
        "Deliveries of one work message (5-100) before Pub/Sub moves it to the dead-letter topic.",
        default=DEFAULT_MAX_DELIVERY_ATTEMPTS,
    )
    input_buckets = var(
        "input_buckets",
        "list(string)",
        "Other buckets holding shard inputs; the workers get read access to their objects.",
        default=[],
    )
    gpu_image = var(
        "gpu_image",
        "string",
        "Boot image of runs with GPUs (--gpu), with the NVIDIA driver and Python 3.11; empty: "
        "a Deep Learning VM image (runner.backends.gcp.shapes.groups.DEFAULT_GPU_IMAGE).",
        default="",
    )
    container_image = var(
        "container_image",
        "string",
        "Boot image of runs with --image: one with podman or docker and Python 3.11 (the "
        "default Debian image has no container engine); empty: such runs are refused.",
        default="",
    )
    return Inputs(
        project=project.string_value,
        region=region.string_value,
        zone=zone.string_value,
        zones=zones.list_value,
        name_prefix=name_prefix.string_value,
        bucket_name=bucket_name.string_value,
        machine_type=machine_type.string_value,
        disk_size_gb=disk_size_gb.number_value,
        shard_count=shard_count.number_value,
        slots=slots.number_value,
        spot=spot.boolean_value,
        image_family=image_family.string_value,
        image_project=image_project.string_value,
        idle_timeout=idle_timeout.number_value,
        retention_days=retention_days.number_value,
        max_delivery_attempts=max_delivery_attempts.number_value,
        input_buckets=input_buckets.list_value,
        gpu_image=gpu_image.string_value,
        container_image=container_image.string_value,
    )
