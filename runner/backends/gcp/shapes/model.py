"""What a run's machine shape is, from its options: pure rules, no Compute Engine client.

:class:`Shape` is what a run's VMs look like (machine type, Spot or standard, GPUs, boot disk,
a container engine); :func:`check_shape_options` reads it from a run's options and refuses bad
ones with one line (:class:`ShapeError`); :func:`needs_groups` says whether a run needs groups
of its own and :func:`run_shapes` which shapes those are. Making the groups is
:class:`runner.backends.gcp.shapes.groups.Shapes`'s work; importing this module loads no cloud
client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from worker.errors import ConfigError
from worker.protocol import RunOptions

if TYPE_CHECKING:
    from runner.backends.gcp.shapes.queues import ShapeQueue

PROVISIONING = ("spot", "standard")
FALLBACKS = ("standard",)
MIN_DISK_GB, MAX_DISK_GB = 10, 65_536  # a boot disk's size range (pd-balanced)
HASH_CHARS = 8


class ShapeError(ConfigError):
    """A machine shape that cannot run: unknown, unsupported in the zone, or short of quota."""


@dataclass(frozen=True)
class Shape:
    """What a run's VMs look like; ``None`` fields keep the deployment's value."""

    machine_type: str | None = None
    provisioning: str | None = None  # "spot" | "standard"
    gpu_type: str | None = None
    gpu_count: int = 0
    disk_gb: int | None = None
    # The run has an --image: its VMs need a container engine, which the deployment's boot
    # image (Debian) lacks; they boot the deployment's container_image instead.
    engine: bool = False

    @classmethod
    def parse(
        cls,
        *,
        machine_type: str | None = None,
        provisioning: str | None = None,
        gpu: str | None = None,
        disk_gb: int | None = None,
        engine: bool = False,
    ) -> Shape:
        """From the ``submit`` options; ``gpu`` is ``TYPE[:COUNT]`` (``nvidia-l4:1``)."""
        if provisioning is not None and provisioning not in PROVISIONING:
            raise ShapeError(f"--provisioning must be spot or standard, not {provisioning!r}")
        if machine_type is not None and not re.fullmatch(r"[a-z][a-z0-9-]{1,62}", machine_type):
            raise ShapeError(f"--machine-type {machine_type!r} is not a machine type name")
        gpu_type, gpu_count = None, 0
        if gpu:
            m = re.fullmatch(r"([a-z][a-z0-9-]+)(?::(\d+))?", gpu)
            if m is None or int(m[2] or 1) not in (1, 2, 4, 8):
                raise ShapeError(f"--gpu {gpu!r}: give TYPE[:COUNT], COUNT 1, 2, 4 or 8")
            gpu_type, gpu_count = m[1], int(m[2] or 1)
        if disk_gb is not None and not MIN_DISK_GB <= disk_gb <= MAX_DISK_GB:
            raise ShapeError(f"--disk-gb {disk_gb}: give {MIN_DISK_GB} to {MAX_DISK_GB}")
        return cls(machine_type, provisioning, gpu_type, gpu_count, disk_gb, engine)

    @classmethod
    def from_options(cls, options: Any, *, cloud: bool = True) -> Shape:
        """The shape recorded in a run's options (:class:`worker.protocol.RunOptions`); on
        Google Cloud (``cloud``) a run with an image needs VMs with a container engine."""
        return cls.parse(
            machine_type=getattr(options, "machine_type", None),
            provisioning=getattr(options, "provisioning", None),
            gpu=getattr(options, "gpu", None),
            disk_gb=getattr(options, "disk_gb", None),
            engine=cloud and getattr(options, "image", None) is not None,
        )

    @property
    def is_default(self) -> bool:
        """Nothing asked for: the run uses the deployment's group as it is."""
        return self == Shape()

    def standard(self) -> Shape:
        """The same shape on standard VMs (the fallback's group)."""
        return dataclasses.replace(self, provisioning="standard")

    def digest(self, base_template: str, *, image: str | None = None) -> str:
        """A content hash of the deployment's template (by its unique link) and this shape
        (and, for a GPU shape, the boot image it gets instead of the deployment's)."""
        content: dict[str, Any] = {"base": base_template, **asdict(self)}
        if image is not None:
            content["image"] = image
        text = json.dumps(content, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:HASH_CHARS]


@dataclass(frozen=True)
class ShapedGroup:
    """The group (and template) a shaped run's VMs come from."""

    group: str
    template: str
    shape: Shape
    created: bool  # made now, not reused
    machine_type: str = ""  # what its VMs are (the shape's, or the deployment's)
    digest: str = ""  # the shape's hash: the group, template, topic and subscription share it
    queue: ShapeQueue | None = None  # the shape's work topic and subscription

    @property
    def describe(self) -> str:
        """``n1-standard-8, Spot, nvidia-l4:1, 200 GB``."""
        parts = [self.machine_type, "Spot" if self.shape.provisioning == "spot" else "standard"]
        if self.shape.gpu_type:
            parts.append(f"{self.shape.gpu_type}:{self.shape.gpu_count}")
        if self.shape.disk_gb:
            parts.append(f"{self.shape.disk_gb} GB disk")
        return ", ".join(parts)


def check_shape_options(options: RunOptions) -> Shape:
    """The run's shape, or one line on what is wrong with the options."""
    if options.fallback is not None and options.fallback not in FALLBACKS:
        raise ShapeError(f"--fallback must be standard, not {options.fallback!r}")
    if options.fallback_after < 1:
        raise ShapeError("--fallback-after must be 1 or more preemptions")
    shape = Shape.from_options(options)
    if options.fallback and shape.provisioning == "standard":
        raise ShapeError("--fallback standard needs Spot VMs first; drop --provisioning standard")
    return shape


def needs_groups(options: RunOptions, *, cloud: bool = True) -> bool:
    """Whether the run needs groups of its own (a shape, a fallback or, on Google Cloud
    (``cloud``), an image: VMs with a container engine)."""
    shape = Shape.from_options(options, cloud=cloud)
    return not shape.is_default or options.fallback is not None


def run_shapes(options: RunOptions) -> list[Shape]:
    """The shapes a run's groups were made for (the Spot one first, then the standard one)."""
    if not needs_groups(options):
        return []
    shape = check_shape_options(options)
    if options.fallback:
        spot = dataclasses.replace(shape, provisioning="spot")
        return [spot, shape.standard()]
    return [shape]


def is_spot(shape: Shape, base_props: dict[str, Any]) -> bool:
    """Whether VMs of ``shape`` are Spot VMs: as it says, else as the deployment's template."""
    if shape.provisioning is not None:
        return shape.provisioning == "spot"
    return base_props.get("scheduling", {}).get("provisioningModel") == "SPOT"
