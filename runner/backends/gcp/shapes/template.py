"""A shape's instance template: the deployment's template's ``properties`` changed for it.

Pure functions over REST JSON, no cloud client (:mod:`runner.backends.gcp.shapes.groups` makes
the template from them): the machine type, Spot or standard scheduling, GPUs and the boot image
that has their driver (or a container engine), the disk, and the metadata the VM's startup
script reads.
"""

from __future__ import annotations

import copy
from typing import Any

from runner.backends.gcp.shapes.model import Shape, ShapeError

# A Deep Learning VM image family with CUDA 12.4 from Google's deeplearning-platform-release
# project. Google lists the current families at
# https://cloud.google.com/deep-learning-vm/docs/images (and `gcloud compute images list
# --project deeplearning-platform-release --no-standard-images` lists them); they are named
# common-cu<CUDA>-<OS>-<framework Python>, and they move on as CUDA versions age, so the family is
# read before use (shapes.images) and one that is gone is refused in one line. The driver comes
# with the install-nvidia-driver metadata below. Debian 12, like the stack's default image: its
# system python3 is 3.11, the Python the VMs' wheelhouse is resolved for
# (runner.backends.gcp.wheels.VM_PYTHON; "py310" is the image's own framework environment).
# The deployment's gpu_image setting overrides it.
DEFAULT_GPU_IMAGE = (
    "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-12-py310"
)
# Metadata Deep Learning VM images read at first boot: install the NVIDIA driver.
DRIVER_METADATA = ("install-nvidia-driver", "True")


def derive_properties(
    base: dict[str, Any],
    shape: Shape,
    *,
    spot: bool,
    gpu_image: str = DEFAULT_GPU_IMAGE,
    container_image: str | None = None,
) -> dict[str, Any]:
    """The instance template ``properties`` (REST JSON) of ``shape``, from the deployment's."""
    props = copy.deepcopy(base)
    if shape.machine_type:
        props["machineType"] = shape.machine_type
    scheduling = props.setdefault("scheduling", {})
    if spot:
        scheduling.update(
            provisioningModel="SPOT",
            preemptible=True,
            automaticRestart=False,
            instanceTerminationAction="DELETE",
        )
    else:
        scheduling.update(provisioningModel="STANDARD", preemptible=False, automaticRestart=True)
        scheduling.pop("instanceTerminationAction", None)
    gpus = shape.gpu_type is not None or bundles_gpus(props.get("machineType", ""))
    # VMs with GPUs cannot live-migrate: the API refuses MIGRATE for them.
    scheduling["onHostMaintenance"] = "TERMINATE" if spot or gpus else "MIGRATE"
    if shape.gpu_type and not bundles_gpus(props.get("machineType", "")):
        props["guestAccelerators"] = [
            {"acceleratorType": shape.gpu_type, "acceleratorCount": shape.gpu_count}
        ]
    else:
        props.pop("guestAccelerators", None)
    for disk in props.get("disks", []):
        if not disk.get("boot"):
            continue
        params = disk.setdefault("initializeParams", {})
        if shape.disk_gb is not None:
            params["diskSizeGb"] = str(shape.disk_gb)
        if gpus:  # the deployment's image has no NVIDIA driver
            params["sourceImage"] = gpu_image
            disk.pop("source", None)
        elif shape.engine and container_image:  # nor a container engine
            params["sourceImage"] = container_image
            disk.pop("source", None)
    if gpus:
        set_metadata(props, *DRIVER_METADATA)
        # The driver the image installs at first boot is a kernel module built on the VM, not
        # signed by a key Secure Boot trusts, so it would not load; vTPM and integrity
        # monitoring stay as the deployment has them.
        shielded = props.get("shieldedInstanceConfig")
        if isinstance(shielded, dict) and shielded.get("enableSecureBoot"):
            shielded["enableSecureBoot"] = False
    return props


def bundles_gpus(machine_type: str) -> bool:
    """Accelerator-optimized series (a2, a3, g2, ...) come with their GPUs attached."""
    return machine_type.split("-", 1)[0] in {"a2", "a3", "a4", "g2", "g4"}


def boot_image(
    shape: Shape, props: dict[str, Any], *, gpu_image: str, engine_image: str | None
) -> tuple[str, str] | None:
    """The image VMs of ``shape`` boot instead of the deployment's (template ``props``), and
    why ("gpu" or "engine"); None: the deployment's. ``engine_image``: the deployment's image
    with a container engine (None: runs with ``--image`` are refused)."""
    machine_type = shape.machine_type or str(props.get("machineType", ""))
    if shape.gpu_type is not None or bundles_gpus(machine_type):
        return gpu_image, "gpu"
    if not shape.engine:
        return None
    if not engine_image:
        raise ShapeError(
            "--image needs VMs with a container engine, and the deployment's boot image"
            " has none: deploy with container_image set to an image with podman or"
            " docker and Python 3.11 (see the README, Containers)"
        )
    return engine_image, "engine"


def set_metadata(props: dict[str, Any], key: str, value: str) -> None:
    items = props.setdefault("metadata", {}).setdefault("items", [])
    for item in items:
        if item.get("key") == key:
            item["value"] = value
            return
    items.append({"key": key, "value": value})
