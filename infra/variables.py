"""The stack's inputs: Terraform variables with defaults, set with ``--var`` or ``TF_VAR_<name>``.

They live in an ``inputs`` construct (the stack's outputs take the plain ids ``project``,
``region``, ...) with their Terraform names overridden to exactly the names below, e.g.
``cdktf deploy --var project=my-project --var shard_count=125``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cdktf import IResolvable, TerraformVariable, TerraformVariableValidationConfig
from constructs import Construct

from infra.contract import DEFAULT_MAX_VM_HOURS
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
    zones: list[str]  # a regional group's zones; empty: every zone of the region that is up
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
    max_vm_hours: float
    retention_days: float
    max_delivery_attempts: float
    input_buckets: list[str]
    gpu_image: str  # empty: the runner's default for machine shapes with GPUs
    container_image: str  # empty: runs with --image are refused (Debian has no container engine)


@dataclass(frozen=True)
class _Variable:
    """One variable: its name (also an ``Inputs`` field), Terraform type, and default.

    A ``default`` of None declares a required variable.
    """

    name: str
    type: str
    description: str
    default: Any = None
    validation: list[TerraformVariableValidationConfig] | None = None


# Where the deployment lives.
_PLACEMENT = (
    _Variable("project", "string", "Google Cloud project id to deploy into (required)."),
    _Variable(
        "region", "string", "Region of the bucket, subnet and group.", default=DEFAULT_REGION
    ),
    _Variable(
        "zone",
        "string",
        "Zone for a zonal worker group; empty (the default) for a regional group, which finds "
        "Spot capacity in any zone of the region.",
        default="",
    ),
    _Variable(
        "zones",
        "list(string)",
        "Zones a regional group may use; empty (the default) means every zone of the region "
        "that is up.",
        default=[],
    ),
)

# What its resources are called.
_NAMING = (
    _Variable(
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
    ),
    _Variable(
        "bucket_name",
        "string",
        "Bucket name (globally unique); empty (the default) means <project>-<name_prefix>.",
        default="",
    ),
)

# The worker VMs and their group.
_WORKERS = (
    _Variable(
        "machine_type", "string", "Machine type of the worker VMs.", default=DEFAULT_MACHINE_TYPE
    ),
    _Variable(
        "disk_size_gb", "number", "Boot disk size of each VM, in GB.", default=DEFAULT_DISK_SIZE_GB
    ),
    _Variable(
        "shard_count",
        "number",
        "The group's initial size. After creation the runner owns the size; later deploys "
        "do not change it.",
        default=0,
    ),
    _Variable("slots", "number", "Shards each worker VM runs at once.", default=defaults.SLOTS),
    _Variable("spot", "bool", "Spot VMs (true) or standard VMs (false).", default=True),
    _Variable(
        "image_family",
        "string",
        "Image family; resolved to one image at deploy time, so every VM boots the same image.",
        default=DEFAULT_IMAGE_FAMILY,
    ),
    _Variable(
        "image_project", "string", "Project of the image family.", default=DEFAULT_IMAGE_PROJECT
    ),
)

# How long things live, how often work is retried, and what the workers may read.
_OPERATIONS = (
    _Variable(
        "idle_timeout",
        "number",
        "Seconds a worker waits idle before it removes its own VM from the group.",
        default=int(defaults.IDLE_TIMEOUT),
    ),
    _Variable(
        "max_vm_hours",
        "number",
        "Hours after its boot at which a worker VM removes itself from its group (or powers "
        "off), whatever its worker is doing: the bound on a VM whose worker is stuck. Its shards "
        "go back to the queue, as on a preemption.",
        default=DEFAULT_MAX_VM_HOURS,
        validation=[
            TerraformVariableValidationConfig(
                condition="${var.max_vm_hours >= 1 && floor(var.max_vm_hours) == var.max_vm_hours}",
                error_message="max_vm_hours must be a whole number of hours, at least 1.",
            )
        ],
    ),
    _Variable(
        "retention_days",
        "number",
        "Days after which objects under runs/ in the bucket are deleted.",
        default=DEFAULT_RETENTION_DAYS,
    ),
    _Variable(
        "max_delivery_attempts",
        "number",
        "Deliveries of one work message (5-100) before Pub/Sub moves it to the dead-letter topic.",
        default=DEFAULT_MAX_DELIVERY_ATTEMPTS,
    ),
    _Variable(
        "input_buckets",
        "list(string)",
        "Other buckets holding shard inputs; the workers get read access to their objects.",
        default=[],
    ),
)

# Boot images the runner picks per run; the deployment only passes them through.
_RUN_IMAGES = (
    _Variable(
        "gpu_image",
        "string",
        "Boot image of runs with GPUs (--gpu), with the NVIDIA driver and Python 3.11; empty: "
        "a Deep Learning VM image (runner.backends.gcp.shapes.groups.DEFAULT_GPU_IMAGE).",
        default="",
    ),
    _Variable(
        "container_image",
        "string",
        "Boot image of runs with --image: one with podman or docker and Python 3.11 (the "
        "default Debian image has no container engine); empty: such runs are refused.",
        default="",
    ),
)

# In declaration order, which is the order of the synthesized variables.
_VARIABLES = (*_PLACEMENT, *_NAMING, *_WORKERS, *_OPERATIONS, *_RUN_IMAGES)


def _declare(scope: Construct, spec: _Variable) -> Any:
    """Declare ``spec`` under its own Terraform name and return its token-valued handle."""
    variable = TerraformVariable(
        scope,
        spec.name,
        type=spec.type,
        description=spec.description,
        default=spec.default,
        validation=spec.validation,
    )
    variable.override_logical_id(spec.name)
    if spec.type == "string":
        return variable.string_value
    if spec.type == "number":
        return variable.number_value
    if spec.type == "bool":
        return variable.boolean_value
    if spec.type == "list(string)":
        return variable.list_value
    raise ValueError(f"variable {spec.name}: no handle for Terraform type {spec.type}")


def declare_inputs(scope: Construct) -> Inputs:
    """Declare every variable under ``scope`` and return handles on them."""
    inputs = Construct(scope, "inputs")
    return Inputs(**{spec.name: _declare(inputs, spec) for spec in _VARIABLES})
