"""Machine shape per run: machine type, Spot or standard, GPUs, boot disk size.

A run that asks for a shape gets a managed instance group of its own, ``<group>-<hash>``, made
from an instance template derived from the deployment's (``instanceTemplates.get``, then an
``insert`` of a copy with the shape). Both are named by a content hash of the deployment's
template and the shape, so a second run with the same shape reuses them, and a redeploy (a new
worker, a new image) gives new ones.

Why a group per shape and not the deployment's group pointed at a new template: a group has one
template for the VMs it creates, so re-pointing it while another run's VMs work would give that
run's recreated (preempted) VMs the wrong machine, and an update policy could even replace its
busy VMs. A group per shape never touches another run's VMs. Its instances are named
``<base instance name>-<hash>-xxxx``, so the worker's conditioned right to delete its own VM
(names starting ``<prefix>-worker-``) still holds, and no new right is needed.

Each shape also has a work topic and subscription of its own
(:mod:`runner.backends.gcp.shapes.queues`, named by the same hash), which the shaped template's
metadata names: a shape's VMs pull only its runs' shards, so concurrent runs of different shapes
never run each other's shards.

A regional deployment (a regional group, with the stack's global instance template) gets
regional shaped groups (``regionInstanceGroupManagers``), spread over the zones of the
deployment group's ``distributionPolicy`` (or the region's zones) that offer the machine type
and the GPU; a shape no zone there offers is refused. The templates stay global, as the
deployment's is.

A shape with GPUs boots a GPU-ready image: a Deep Learning VM image (``DEFAULT_GPU_IMAGE``, with
the ``install-nvidia-driver`` metadata Google documents for those images, which installs the
NVIDIA driver at first boot), or the deployment's ``gpu_image`` setting (``CFLOW_GPU_IMAGE``).

Everything is checked before anything is made or published, each refusal one line
(:class:`ShapeError`): the machine type exists in the zone (``machineTypes.get``), the GPU exists
there (``acceleratorTypes.get``) and fits the machine series (accelerator-optimized types such as
``g2`` come with their GPUs; other GPUs attach to ``n1`` only), the region's quotas hold at
least one VM of the shape (CPUs, and ``NVIDIA_<MODEL>_GPUS`` or, for Spot when the project has
any, ``PREEMPTIBLE_NVIDIA_<MODEL>_GPUS``: the rule Compute Engine's quota documentation gives),
and the project-wide ``GPUS_ALL_REGIONS`` quota (``projects.get``) holds its GPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from runner.backends.gcp.quota import SSD_DISKS, VmNeeds, gpu_quota_metric
from worker.errors import ConfigError

if TYPE_CHECKING:
    from runner.backends.gcp.shapes.queues import ShapeQueue, ShapeQueues

PROVISIONING = ("spot", "standard")
GPU_SERIES = "n1"  # the only general-purpose series GPUs attach to
MIN_DISK_GB, MAX_DISK_GB = 10, 65_536  # a boot disk's size range (pd-balanced)
HASH_CHARS = 8
# A Deep Learning VM image family (Google's deeplearning-platform-release project) with CUDA;
# the driver comes with the install-nvidia-driver metadata below. Debian 12, like the stack's
# default image: its python3 is 3.11, the Python the VMs' wheelhouse is resolved for
# (runner.backends.gcp.wheels.VM_PYTHON). The deployment's gpu_image setting overrides it.
DEFAULT_GPU_IMAGE = (
    "projects/deeplearning-platform-release/global/images/family/common-cu124-debian-12"
)
# Metadata Deep Learning VM images read at first boot: install the NVIDIA driver.
DRIVER_METADATA = ("install-nvidia-driver", "True")


__all__ = ["Shape", "ShapeError", "ShapedGroup", "Shapes", "derive_properties", "gpu_quota_metric"]


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
    gpus = shape.gpu_type is not None or _bundles_gpus(props.get("machineType", ""))
    # VMs with GPUs cannot live-migrate: the API refuses MIGRATE for them.
    scheduling["onHostMaintenance"] = "TERMINATE" if spot or gpus else "MIGRATE"
    if shape.gpu_type and not _bundles_gpus(props.get("machineType", "")):
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
        _set_metadata(props, *DRIVER_METADATA)
        # The driver the image installs at first boot is a kernel module built on the VM, not
        # signed by a key Secure Boot trusts, so it would not load; vTPM and integrity
        # monitoring stay as the deployment has them.
        shielded = props.get("shieldedInstanceConfig")
        if isinstance(shielded, dict) and shielded.get("enableSecureBoot"):
            shielded["enableSecureBoot"] = False
    return props


def _bundles_gpus(machine_type: str) -> bool:
    """Accelerator-optimized series (a2, a3, g2, ...) come with their GPUs attached."""
    return machine_type.split("-", 1)[0] in {"a2", "a3", "a4", "g2", "g4"}


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


class Shapes:
    """Check shapes against a zone (or region) and make (or reuse) their template and group.

    Args:
        project: the deployment's project.
        group: the deployment's group (its template is the base of every shape).
        zone: the group's zone (a zonal group).
        region: the group's region (a regional group; used when ``zone`` is empty).
        queues: makes each shape's work topic and subscription (None: the shaped VMs pull the
            deployment's work subscription, as the base template says).
        gpu_image: the boot image of shapes with GPUs.
        container_image: the boot image of runs with ``--image`` (podman or docker, Python
            3.11); None: such runs are refused, as the deployment's Debian has no engine.
    """

    def __init__(
        self,
        *,
        project: str,
        group: str,
        zone: str | None = None,
        region: str | None = None,
        queues: ShapeQueues | None = None,
        gpu_image: str | None = None,
        container_image: str | None = None,
    ) -> None:
        if not zone and not region:
            raise ShapeError(f"instance group {group} needs a zone or a region")
        self.project, self.group, self.zone = project, group, zone
        self.region = zone.rsplit("-", 1)[0] if zone else str(region)
        self.queues = queues
        self.gpu_image = gpu_image or DEFAULT_GPU_IMAGE
        self.container_image = container_image or None
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1  # loads in a second: only for cloud commands

        from runner.backends.gcp.fleet import compute_client_options

        self._compute: Any = compute_v1
        self._gexc: Any = gexc
        credentials, options = compute_client_options()
        kw: dict[str, Any] = {"credentials": credentials, "client_options": options}
        if zone:
            self._where: dict[str, str] = {"zone": zone}
            self._managers: Any = compute_v1.InstanceGroupManagersClient(**kw)
        else:
            self._where = {"region": self.region}
            self._managers = compute_v1.RegionInstanceGroupManagersClient(**kw)
        self._templates: Any = compute_v1.InstanceTemplatesClient(**kw)
        self._types: Any = compute_v1.MachineTypesClient(**kw)
        self._gpus: Any = compute_v1.AcceleratorTypesClient(**kw)
        self._regions: Any = compute_v1.RegionsClient(**kw)
        self._projects: Any = compute_v1.ProjectsClient(**kw)
        self._base: tuple[dict[str, Any], str, dict[str, Any]] | None = None

    @property
    def where(self) -> str:
        return f"zone {self.zone}" if self.zone else f"region {self.region}"

    def close(self) -> None:
        clients = (self._managers, self._templates, self._types, self._gpus, self._regions)
        for client in (*clients, self._projects):
            client.transport.close()

    # -- reading ---------------------------------------------------------------------------

    def base(self) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """The deployment's group (REST JSON), its template's name, and that template."""
        if self._base is not None:
            return self._base
        group = self._managers.get(request={**self._request(self.group)})
        # A group made with versions (as the stack's is) names its template there as well.
        url = group.instance_template or next(
            (v.instance_template for v in group.versions if v.instance_template), ""
        )
        if not url:
            raise ShapeError(f"instance group {self.group} names no instance template to copy")
        name = url.rstrip("/").rsplit("/", 1)[-1]
        template = self._templates.get(request={"project": self.project, "instance_template": name})
        self._base = _json(group), name, _json(template)
        return self._base

    def _request(self, group: str, **fields: Any) -> dict[str, Any]:
        return {"project": self.project, **self._where, "instance_group_manager": group, **fields}

    def _zones(self, base_group: dict[str, Any]) -> list[str]:
        """Where the shape's VMs may go: the zone, or the regional group's zones."""
        if self.zone:
            return [self.zone]
        listed = base_group.get("distributionPolicy", {}).get("zones") or []
        zones = [str(z.get("zone", "")).rsplit("/", 1)[-1] for z in listed]
        if not zones:
            region = self._regions.get(request={"project": self.project, "region": self.region})
            zones = sorted(z.rsplit("/", 1)[-1] for z in region.zones)
        return [z for z in zones if z]

    def check(
        self, shape: Shape, base_props: dict[str, Any], zones: list[str] | None = None
    ) -> list[str]:
        """Refuse (one line) a shape the zones lack or the quotas cannot hold; the zones (of
        ``zones``, default the deployment's) that offer it."""
        machine_type = shape.machine_type or str(base_props.get("machineType", ""))
        spot = self._is_spot(shape, base_props)
        candidates = zones or ([self.zone] if self.zone else self._zones(self.base()[0]))
        offered: list[str] = []
        refusals: list[str] = []
        described: dict[str, Any] = {}
        gpus: dict[str, int] = {}
        for zone in candidates:
            try:
                described, gpus = self._check_zone(shape, machine_type, zone)
                offered.append(zone)
            except ShapeError as refused:
                refusals.append(str(refused))
        if not offered:
            if len(candidates) == 1:
                raise ShapeError(refusals[0])
            raise ShapeError(f"{refusals[0]} (nor in any other zone of {self.region})")
        boot: dict[str, Any] = next((d for d in base_props.get("disks", []) if d.get("boot")), {})
        params = boot.get("initializeParams", {})
        disk_gb = shape.disk_gb or int(params.get("diskSizeGb") or 10)
        disk_type = str(params.get("diskType") or "pd-balanced").rsplit("/", 1)[-1]
        disk = ("SSD_TOTAL_GB" if disk_type in SSD_DISKS else "DISKS_TOTAL_GB", disk_gb)
        self._check_quota(machine_type, int(described.get("guestCpus", 0)), gpus, spot, disk)
        return offered

    def _check_zone(
        self, shape: Shape, machine_type: str, zone: str
    ) -> tuple[dict[str, Any], dict[str, int]]:
        """The machine type as the zone describes it, and the GPUs a VM of the shape has."""
        try:
            described = _json(
                self._types.get(
                    request={"project": self.project, "zone": zone, "machine_type": machine_type}
                )
            )
        except self._gexc.NotFound:
            raise ShapeError(f"machine type {machine_type} does not exist in zone {zone}") from None
        bundled = {
            a["guestAcceleratorType"]: a["guestAcceleratorCount"]
            for a in described.get("accelerators", [])
        }
        gpus: dict[str, int] = dict(bundled)
        if not shape.gpu_type:
            return described, gpus
        if bundled:
            if bundled != {shape.gpu_type: shape.gpu_count}:
                have = ", ".join(f"{t}:{n}" for t, n in bundled.items())
                raise ShapeError(
                    f"machine type {machine_type} comes with {have}; --gpu "
                    f"{shape.gpu_type}:{shape.gpu_count} does not match it (leave --gpu out)"
                )
            return described, gpus
        if not machine_type.startswith(f"{GPU_SERIES}-"):
            raise ShapeError(
                f"GPUs attach only to {GPU_SERIES} machine types or come with "
                f"accelerator-optimized ones (g2 for nvidia-l4); not to {machine_type}"
            )
        try:
            self._gpus.get(
                request={"project": self.project, "zone": zone, "accelerator_type": shape.gpu_type}
            )
        except self._gexc.NotFound:
            raise ShapeError(f"GPU {shape.gpu_type} is not offered in zone {zone}") from None
        return described, {shape.gpu_type: shape.gpu_count}

    def _check_quota(
        self,
        machine_type: str,
        vcpus: int,
        gpus: dict[str, int],
        spot: bool,
        disk: tuple[str, int],
    ) -> None:
        region = self._regions.get(request={"project": self.project, "region": self.region})
        need = VmNeeds(machine_type, vcpus, gpus, spot, disk)
        refusal = need.short_in_region(
            self.region, {q.metric: (q.limit, q.usage) for q in region.quotas}
        )
        if refusal is None and gpus:  # every GPU counts against the project-wide quota too
            project = self._projects.get(request={"project": self.project})
            quotas = {q.metric: (q.limit, q.usage) for q in project.quotas}
            refusal = need.short_in_project(self.project, quotas)
        if refusal is not None:
            raise ShapeError(refusal)

    def _is_spot(self, shape: Shape, base_props: dict[str, Any]) -> bool:
        if shape.provisioning is not None:
            return shape.provisioning == "spot"
        return base_props.get("scheduling", {}).get("provisioningModel") == "SPOT"

    def normalize(self, shape: Shape) -> tuple[Shape, str]:
        """The shape with its provisioning said, and its hash (its group is ``<group>-<hash>``).

        The same VMs whether "spot" was said or came from the deployment: one hash for both.
        """
        _, base_name, base_template = self.base()
        props = base_template.get("properties", {})
        spot = self._is_spot(shape, props)
        shape = dataclasses.replace(shape, provisioning="spot" if spot else "standard")
        machine_type = shape.machine_type or str(props.get("machineType", ""))
        gpus = shape.gpu_type is not None or _bundles_gpus(machine_type)
        link = str(base_template.get("selfLink") or base_name)
        if gpus:
            image = self.gpu_image
        elif shape.engine:
            if not self.container_image:
                raise ShapeError(
                    "--image needs VMs with a container engine, and the deployment's boot image"
                    " has none: deploy with container_image set to an image with podman or"
                    " docker and Python 3.11 (see the README, Containers)"
                )
            image = self.container_image
        else:
            image = None
        return shape, shape.digest(link, image=image)

    # -- making ----------------------------------------------------------------------------

    def ensure(self, shape: Shape) -> ShapedGroup:
        """Check ``shape``, then the template and group for it, made unless they exist."""
        base_group, base_name, base_template = self.base()
        props = base_template.get("properties", {})
        shape, digest = self.normalize(shape)
        zones = self.check(shape, props, None if self.zone else self._zones(base_group))
        name = f"{self.group}-{digest}"
        spot = shape.provisioning == "spot"
        derived = derive_properties(
            props,
            shape,
            spot=spot,
            gpu_image=self.gpu_image,
            container_image=self.container_image,
        )
        _set_metadata(derived, "cflow-group", name)  # a worker removes itself from its own group
        queue = self.queues.ensure(digest) if self.queues is not None else None
        if queue is not None:  # its workers pull (and re-queue on) the shape's own queue
            _set_metadata(derived, "cflow-work-topic", queue.topic)
            _set_metadata(derived, "cflow-subscription", queue.subscription)
        template_url, made_template = self._ensure_template(name, base_name, derived)
        made_group = self._ensure_group(name, base_group, template_url, digest, zones)
        machine_type = str(derived.get("machineType", ""))
        made = made_template or made_group
        return ShapedGroup(name, name, shape, made, machine_type, digest, queue)

    def _ensure_template(self, name: str, base: str, props: dict[str, Any]) -> tuple[str, bool]:
        try:
            found = self._templates.get(
                request={"project": self.project, "instance_template": name}
            )
            return str(found.self_link), False
        except self._gexc.NotFound:
            pass
        body = {
            "name": name,
            "description": f"CFlow worker, a run's shape (from {base})",
            "properties": props,
        }
        resource = self._compute.InstanceTemplate.from_json(
            json.dumps(body), ignore_unknown_fields=True
        )
        try:
            operation = self._templates.insert(
                request={"project": self.project, "instance_template_resource": resource}
            )
        except self._gexc.Conflict:  # another runner made it first: the same content by its name
            operation = None
        except self._gexc.BadRequest as exc:
            raise ShapeError(
                f"Compute Engine refused the template for this shape: {exc.message}"
            ) from None
        if operation is not None:
            operation.result(timeout=120)
        found = self._templates.get(request={"project": self.project, "instance_template": name})
        return str(found.self_link), True

    def _ensure_group(
        self, name: str, base: dict[str, Any], template_url: str, digest: str, zones: list[str]
    ) -> bool:
        try:
            self._managers.get(request=self._request(name))
            return False
        except self._gexc.NotFound:
            pass
        body: dict[str, Any] = {
            "name": name,
            "baseInstanceName": f"{base.get('baseInstanceName') or self.group}-{digest}",
            "instanceTemplate": template_url,
            "targetSize": 0,  # the runner grows it, as it does the deployment's group
            "updatePolicy": base.get("updatePolicy") or {"type": "OPPORTUNISTIC"},
        }
        if not self.zone:  # spread over the zones that offer the shape
            body["distributionPolicy"] = {
                **base.get("distributionPolicy", {}),
                "zones": [{"zone": f"zones/{z}"} for z in zones],
            }
        resource = self._compute.InstanceGroupManager.from_json(
            json.dumps(body), ignore_unknown_fields=True
        )
        field = "instance_group_manager_resource"
        request = {"project": self.project, **self._where, field: resource}
        try:
            operation = self._managers.insert(request=request)
            operation.result(timeout=120)
        except self._gexc.Conflict:
            return False
        except self._gexc.BadRequest as exc:
            raise ShapeError(
                f"Compute Engine refused the group for this shape: {exc.message}"
            ) from None
        return True

    # -- removing (runner.backends.gcp.shapes.cleanup)
    # ---------------------------------------------------

    def list_groups(self) -> list[Any]:
        """Every instance group in the deployment's zone or region."""
        try:
            return list(self._managers.list(request={"project": self.project, **self._where}))
        except self._gexc.GoogleAPICallError as exc:
            raise ShapeError(
                f"could not list the instance groups in {self.where}: {exc.message}"
            ) from None

    def group_instances(self, name: str) -> list[Any]:
        """The instances group ``name`` has (creating, running or being deleted)."""
        return list(self._managers.list_managed_instances(request=self._request(name)))

    def delete_group(self, name: str, *, timeout: float = 120.0) -> None:
        """Delete group ``name`` (gone already is fine), then its template of the same name."""
        try:
            self._managers.delete(request=self._request(name)).result(timeout=timeout)
        except self._gexc.NotFound:
            pass
        except self._gexc.GoogleAPICallError as exc:
            raise ShapeError(f"could not delete instance group {name}: {exc.message}") from None
        request = {"project": self.project, "instance_template": name}
        try:
            self._templates.delete(request=request).result(timeout=timeout)
        except self._gexc.NotFound:
            pass
        except self._gexc.GoogleAPICallError as exc:
            raise ShapeError(f"could not delete instance template {name}: {exc.message}") from None


def _json(message: Any) -> dict[str, Any]:
    """A proto-plus message as the REST JSON it came from (camelCase keys)."""
    out: dict[str, Any] = json.loads(type(message).to_json(message))
    return out


def _set_metadata(props: dict[str, Any], key: str, value: str) -> None:
    items = props.setdefault("metadata", {}).setdefault("items", [])
    for item in items:
        if item.get("key") == key:
            item["value"] = value
            return
    items.append({"key": key, "value": value})
