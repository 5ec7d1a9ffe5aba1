"""Machine shapes checked against the zones and quotas of the deployment's region.

Everything is checked before anything is made or published, each refusal one line
(:class:`ShapeError`): the machine type exists in the zone (``machineTypes.get``), the GPU exists
there (``acceleratorTypes.get``) and fits the machine series (accelerator-optimized types such as
``g2`` come with their GPUs; other GPUs attach to ``n1`` only), the region's quotas hold at
least one VM of the shape (CPUs, and ``NVIDIA_<MODEL>_GPUS`` or, for Spot when the project has
any, ``PREEMPTIBLE_NVIDIA_<MODEL>_GPUS``: the rule Compute Engine's quota documentation gives),
and the project-wide ``GPUS_ALL_REGIONS`` quota (``projects.get``) holds its GPUs.
"""

from __future__ import annotations

import json
from typing import Any

from runner.backends.gcp.quota import SSD_DISKS, VmNeeds
from runner.backends.gcp.shapes.model import Shape, ShapeError, is_spot

GPU_SERIES = "n1"  # the only general-purpose series GPUs attach to


class ShapeChecks:
    """Checks shapes against the zones of a region and its project's quotas.

    Args:
        project: the deployment's project.
        region: the deployment group's region (the zonal group's zone's region).
    """

    def __init__(self, *, project: str, region: str) -> None:
        self.project, self.region = project, region
        from google.api_core import exceptions as gexc

        from runner.backends.gcp.compute import compute_v1  # only for cloud commands
        from runner.backends.gcp.fleet import compute_client_options
        from worker.backends.gcp.retry import COMPUTE
        from worker.backends.gcp.retry_compute import Retried

        self._gexc: Any = gexc
        credentials, options = compute_client_options()
        kw: dict[str, Any] = {"credentials": credentials, "client_options": options}
        self._types: Any = Retried(compute_v1.MachineTypesClient(**kw), COMPUTE)
        self._gpus: Any = Retried(compute_v1.AcceleratorTypesClient(**kw), COMPUTE)
        self._regions: Any = Retried(compute_v1.RegionsClient(**kw), COMPUTE)
        self._projects: Any = Retried(compute_v1.ProjectsClient(**kw), COMPUTE)

    def close(self) -> None:
        for client in (self._types, self._gpus, self._regions, self._projects):
            client.transport.close()

    def region_zones(self, base_group: dict[str, Any]) -> list[str]:
        """Where a regional group's VMs may go: the zones of its distribution policy, or else
        the region's."""
        listed = base_group.get("distributionPolicy", {}).get("zones") or []
        zones = [str(z.get("zone", "")).rsplit("/", 1)[-1] for z in listed]
        if not zones:
            region = self._regions.get(request={"project": self.project, "region": self.region})
            zones = sorted(z.rsplit("/", 1)[-1] for z in region.zones)
        return [z for z in zones if z]

    def check(self, shape: Shape, base_props: dict[str, Any], zones: list[str]) -> list[str]:
        """Refuse (one line) a shape the zones lack or the quotas cannot hold; the zones (of
        ``zones``) that offer it."""
        machine_type = shape.machine_type or str(base_props.get("machineType", ""))
        spot = is_spot(shape, base_props)
        candidates = zones
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
            described = rest_json(
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


def rest_json(message: Any) -> dict[str, Any]:
    """A proto-plus message as the REST JSON it came from (camelCase keys)."""
    out: dict[str, Any] = json.loads(type(message).to_json(message))
    return out
