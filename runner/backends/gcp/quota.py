"""Regional quotas against the worker group: how many VMs fit, and what to ask for.

A fresh project has far fewer vCPUs than a 125-VM run needs (250 for e2-standard-2), and a group
short of quota keeps its VMs "starting" for ever. ``runner doctor`` reads the region's quotas
(``regions.get``) and the group's instance template, and says how many VMs fit and which quota
to raise. The metrics, from Compute Engine's quota documentation:

- ``CPUS`` and the machine series' own CPU quotas (``N2_CPUS``, ``N2D_CPUS``, ``C2_CPUS``,
  ``C2D_CPUS``, ``C3_CPUS``, ``A2_CPUS``, ``G2_CPUS``, ...): a VM's vCPUs count against its
  series' quota where the series has one, and ``n1``, ``e2`` and the shared-core types against
  ``CPUS`` (:func:`cpu_quota_metric`).
- ``PREEMPTIBLE_CPUS``: Spot and preemptible VMs use it when the project has any (limit > 0);
  otherwise they use their series' quota, like standard VMs.
- ``SSD_TOTAL_GB``: pd-balanced and pd-ssd boot disks (the template's ``pd-balanced``);
  ``DISKS_TOTAL_GB`` is for pd-standard.
- ``GPUS_ALL_REGIONS``: every GPU of the project, in any region, Spot or not (``projects.get``);
  a machine shape with GPUs (:class:`VmNeeds`) needs it besides the region's GPU quota.
- ``IN_USE_ADDRESSES``: external IPv4 addresses. The workers have none (egress through Cloud
  NAT), so it does not limit the group; it is reported for completeness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SIZES = (125, 2000)  # the README's run sizes: the doctor says what each needs
SSD_DISKS = {"pd-balanced", "pd-ssd", "hyperdisk-balanced"}
# Accelerator type -> its quota metric's model part, where it is not the type upper-cased
# without "tesla" (nvidia-tesla-t4 -> NVIDIA_T4_GPUS, nvidia-l4 -> NVIDIA_L4_GPUS).
QUOTA_MODEL = {"nvidia-h100-80gb": "NVIDIA_H100", "nvidia-a100-80gb": "NVIDIA_A100_80GB"}
ALL_REGIONS_GPUS = "GPUS_ALL_REGIONS"  # the project-wide GPU quota (projects.get)
# Machine series whose vCPUs count against a regional CPU quota of their own, named
# <SERIES>_CPUS; the others (n1, e2, f1, g1) count against CPUS. The rule is Compute Engine's
# allocation quotas page (https://cloud.google.com/compute/resource-usage, "CPU quota"); the
# names are the API's quota metrics (Quota.Metric in the Compute v1 API,
# https://cloud.google.com/dotnet/docs/reference/Google.Cloud.Compute.V1/latest/Google.Cloud.Compute.V1.Quota.Types.Metric).
# A region that does not list a series' metric does not limit it apart from CPUS.
SERIES_CPUS = {
    series: f"{series.upper()}_CPUS"
    for series in ("n2", "n2d", "c2", "c2d", "c3", "a2", "g2", "m1", "m2", "m3", "t2a", "t2d")
}
PREEMPTIBLE_CPUS = "PREEMPTIBLE_CPUS"


def cpu_quota_metric(
    machine_type: str, *, spot: bool, quotas: Mapping[str, tuple[float, float]]
) -> str:
    """The regional quota a VM's vCPUs count against, given the region's quotas (metric ->
    (limit, usage)): ``PREEMPTIBLE_CPUS`` for Spot when the project has any, else the machine
    series' own (``N2_CPUS`` for ``n2-standard-8``) where the region lists it, else ``CPUS``."""
    if spot and quotas.get(PREEMPTIBLE_CPUS, (0.0, 0.0))[0] > 0:
        return PREEMPTIBLE_CPUS
    metric = SERIES_CPUS.get(machine_type.split("-", 1)[0])
    return metric if metric is not None and metric in quotas else "CPUS"


@dataclass(frozen=True)
class Quota:
    metric: str
    limit: float
    usage: float

    @property
    def free(self) -> float:
        return max(self.limit - self.usage, 0.0)


@dataclass(frozen=True)
class Template:
    machine_type: str
    vcpus: int
    disk_gb: float
    disk_type: str
    spot: bool


@dataclass(frozen=True)
class Fit:
    """How many VMs the quotas allow, which quota binds, and what ``vms`` VMs would need."""

    vms: int  # VMs that fit now
    cpu_metric: str
    limits: dict[str, float]  # metric -> VMs it allows
    needs: dict[int, dict[str, int]]  # run size -> metric -> limit to ask for

    def line(self, region: str, template: Template) -> str:
        kind = "Spot " if template.spot else ""
        binding = min(self.limits, key=lambda m: self.limits[m])
        text = f"{self.vms} {kind}{template.machine_type} VMs fit in {region} ({binding} binds)"
        asks = []
        for size, need in self.needs.items():
            if size > self.vms:
                parts = ", ".join(f"{m} {n}" for m, n in need.items())
                asks.append(f"for {size} VMs ask for {parts}")
        return text + ("; " + "; ".join(asks) if asks else "")


def fit(quotas: dict[str, Quota], template: Template, sizes: tuple[int, ...] = SIZES) -> Fit:
    """The VMs the region's quotas allow for this template, and the limits each size needs."""
    listed = {m: (q.limit, q.usage) for m, q in quotas.items()}
    cpu_metric = cpu_quota_metric(template.machine_type, spot=template.spot, quotas=listed)
    disk_metric = "SSD_TOTAL_GB" if template.disk_type in SSD_DISKS else "DISKS_TOTAL_GB"
    per_vm = {cpu_metric: float(template.vcpus), disk_metric: template.disk_gb}
    limits = {}
    for metric, amount in per_vm.items():
        quota = quotas.get(metric)
        if quota is not None and amount > 0:
            limits[metric] = quota.free / amount
    vms = int(min(limits.values())) if limits else 0
    needs = {
        size: {
            metric: math.ceil(amount * size + (quotas[metric].usage if metric in quotas else 0))
            for metric, amount in per_vm.items()
        }
        for size in sizes
    }
    return Fit(vms=vms, cpu_metric=cpu_metric, limits=limits, needs=needs)


def read_region(project: str, region: str) -> tuple[dict[str, Quota], list[str]]:
    """The region's quotas by metric, and its zones (``regions.get``)."""
    from runner.backends.gcp.compute import compute_v1  # only when asked
    from runner.backends.gcp.fleet import compute_client_options
    from worker.backends.gcp.retry import COMPUTE
    from worker.backends.gcp.retry_compute import Retried

    credentials, options = compute_client_options()
    client: Any = Retried(
        compute_v1.RegionsClient(credentials=credentials, client_options=options), COMPUTE
    )
    try:
        found = client.get(request={"project": project, "region": region})
    finally:
        client.transport.close()
    quotas = {q.metric: Quota(q.metric, q.limit, q.usage) for q in found.quotas}
    return quotas, sorted(z.rsplit("/", 1)[-1] for z in found.zones)


def read_template(project: str, template_url: str, zone: str) -> Template:
    """The machine type, vCPUs and boot disk of the group's instance template."""
    from runner.backends.gcp.compute import compute_v1  # only when asked
    from runner.backends.gcp.fleet import compute_client_options
    from worker.backends.gcp.retry import COMPUTE
    from worker.backends.gcp.retry_compute import Retried

    credentials, options = compute_client_options()
    templates: Any = Retried(
        compute_v1.InstanceTemplatesClient(credentials=credentials, client_options=options),
        COMPUTE,
    )
    types: Any = Retried(
        compute_v1.MachineTypesClient(credentials=credentials, client_options=options), COMPUTE
    )
    try:
        name = template_url.rstrip("/").rsplit("/", 1)[-1]
        props = templates.get(request={"project": project, "instance_template": name}).properties
        machine_type = props.machine_type.rsplit("/", 1)[-1]
        described = types.get(
            request={"project": project, "zone": zone, "machine_type": machine_type}
        )
        boot = next((d for d in props.disks if d.boot), None)
        disk_gb = float(boot.initialize_params.disk_size_gb) if boot else 10.0
        disk_type = (boot.initialize_params.disk_type if boot else "") or "pd-balanced"
        spot = props.scheduling.provisioning_model == "SPOT" or bool(props.scheduling.preemptible)
    finally:
        templates.transport.close()
        types.transport.close()
    return Template(
        machine_type=machine_type,
        vcpus=int(described.guest_cpus),
        disk_gb=disk_gb,
        disk_type=disk_type.rsplit("/", 1)[-1],
        spot=spot,
    )


def gpu_quota_metric(gpu_type: str, *, spot: bool) -> str:
    """``NVIDIA_L4_GPUS`` or ``PREEMPTIBLE_NVIDIA_L4_GPUS`` for ``nvidia-l4``."""
    model = QUOTA_MODEL.get(gpu_type) or gpu_type.replace("-tesla", "").replace("-", "_").upper()
    return f"{'PREEMPTIBLE_' if spot else ''}{model}_GPUS"


@dataclass(frozen=True)
class VmNeeds:
    """What one VM of a machine shape takes from the quotas (runner.backends.gcp.shapes.checks)."""

    machine_type: str
    vcpus: int
    gpus: dict[str, int]  # accelerator type -> count
    spot: bool
    disk: tuple[str, int]  # (SSD_TOTAL_GB or DISKS_TOTAL_GB, GB)

    @property
    def kind(self) -> str:
        return "Spot" if self.spot else "standard"

    def short_in_region(self, region: str, quotas: dict[str, tuple[float, float]]) -> str | None:
        """The refusal line when the region's quotas (metric -> (limit, usage)) cannot hold one
        VM, or None."""

        def metric_for(standard: str, preemptible: str) -> str:
            # Spot VMs use the preemptible quota when the project has any, else the standard one.
            use_preemptible = self.spot and quotas.get(preemptible, (0.0, 0.0))[0] > 0
            return preemptible if use_preemptible else standard

        cpus = cpu_quota_metric(self.machine_type, spot=self.spot, quotas=quotas)
        needs = {cpus: self.vcpus, self.disk[0]: self.disk[1]}
        for gpu_type, count in self.gpus.items():
            standard = gpu_quota_metric(gpu_type, spot=False)
            needs[metric_for(standard, gpu_quota_metric(gpu_type, spot=True))] = count
        for metric, amount in needs.items():
            if metric == self.disk[0] and metric not in quotas:
                continue  # a region that lists no disk quota does not limit disks
            limit, usage = quotas.get(metric, (0.0, 0.0))
            if limit - usage < amount:
                return (
                    f"not one {self.kind} {self.machine_type} VM fits in {region}: it needs "
                    f"{amount} {metric}, the project has {limit - usage:g} free (limit "
                    f"{limit:g}); ask for {metric} {usage + amount:g} in {region} on the "
                    "console's Quotas page"
                )
        return None

    def short_in_project(self, project: str, quotas: dict[str, tuple[float, float]]) -> str | None:
        """The refusal line when the project-wide GPU quota (``projects.get``) cannot hold the
        VM's GPUs, Spot or not, or None."""
        limit, usage = quotas.get(ALL_REGIONS_GPUS, (0.0, 0.0))
        amount = sum(self.gpus.values())
        if amount == 0 or limit - usage >= amount:
            return None
        return (
            f"not one {self.kind} {self.machine_type} VM fits in project {project}: it needs "
            f"{amount} {ALL_REGIONS_GPUS}, the project has {limit - usage:g} free (limit "
            f"{limit:g}); ask for {ALL_REGIONS_GPUS} {usage + amount:g} (global) on the "
            "console's Quotas page"
        )
