"""The fake Compute API's VMs and groups, and how a group keeps its VMs (tests/gcp/fake_compute.py).

A :class:`Group` holds :class:`Vm` records; each "VM" is a process made by the fake's ``spawn``
(or a :class:`PaperVm` for groups of thousands). :class:`VmReconciler` is a managed instance
group's behaviour: it keeps ``targetSize`` instances, recreates one whose process died without
being deleted (a Spot preemption), leaves one that powered itself off TERMINATED under
``defaultActionOnFailure`` DO_NOTHING, never creates a VM whose boot disk is smaller than its
image or that is past the region's CPUS quota or its machine series' own (``lastAttempt.errors``
instead), and "deletes" by SIGTERM.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.gcp.fake_images import FakeImages
from tests.gcp.fake_templates import TemplateApi
from tests.gcp.fault_compute import BASE, POWERED_OFF, ComputeFaults, cpu_metric, failure_action

Spawn = Callable[[str], subprocess.Popen[Any]]
ZONAL_LIMIT, REGIONAL_LIMIT = 1000, 2000  # VMs a group can hold


@dataclass
class Vm:
    name: str
    zone: str
    proc: subprocess.Popen[Any] | None = None
    action: str = "CREATING"
    deleting: bool = False
    recreated: int = 0
    error: dict[str, str] | None = None  # lastAttempt's error while it cannot be created
    terminated: bool = False  # powered itself off, left so by DO_NOTHING


@dataclass
class Group:
    project: str
    scope: str  # "zones" | "regions"
    where: str  # the zone or region
    name: str
    target_size: int = 0
    vms: dict[str, Vm] = field(default_factory=dict)
    template: str = ""  # the instance template's name
    base_instance_name: str = ""  # VMs are named <base>-xxxx ("": the group's name)
    zones: list[str] = field(default_factory=list)  # a regional group's distribution zones
    record: dict[str, Any] = field(default_factory=dict)  # a shaped group, as inserted
    resizes: list[int] = field(default_factory=list)

    @property
    def self_link(self) -> str:
        where = f"{BASE}/projects/{self.project}/{self.scope}/{self.where}"
        return f"{where}/instanceGroupManagers/{self.name}"

    def instance_zone(self) -> str:
        if self.scope == "zones":
            return self.where
        return self.zones[0] if self.zones else f"{self.where}-b"

    @property
    def region(self) -> str:
        return self.where.rsplit("-", 1)[0] if self.scope == "zones" else self.where

    @property
    def size_limit(self) -> int:
        return ZONAL_LIMIT if self.scope == "zones" else REGIONAL_LIMIT

    def instance_url(self, vm: Vm) -> str:
        return f"{BASE}/projects/{self.project}/zones/{vm.zone}/instances/{vm.name}"


class PaperVm:
    """A VM without a process, for groups of thousands: alive until signalled."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self.pid = 0

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.returncode = -sig

    def kill(self) -> None:
        self.returncode = -signal.SIGKILL

    def wait(self, timeout: float | None = None) -> int:
        return self.returncode if self.returncode is not None else 0


def paper(name: str) -> subprocess.Popen[Any]:
    """``spawn`` for groups too large for a process per VM."""
    return PaperVm()  # type: ignore[return-value]


def sleeper(name: str) -> subprocess.Popen[Any]:
    """A stand-in VM that only waits to be deleted."""
    return subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)


def region_zones(region: str) -> list[str]:
    """The zones ``regions.get`` lists for a region (a fake's: b, c and f)."""
    return [f"{region}-{z}" for z in "bcf"]


class VmReconciler(TemplateApi):
    """A managed instance group's behaviour, for every group of the fake: reconciled every
    50 ms by a thread of the fake, and at once after a resize."""

    group: Group
    groups: dict[str, Group]
    spawn: Spawn
    shaped_spawn: Callable[[str, dict[str, str]], subprocess.Popen[Any]] | None
    recreate: bool
    cpu_quota: int | None
    cpus_per_vm: int
    quotas: dict[str, tuple[float, float]]
    faults: ComputeFaults
    images: FakeImages
    default_action_on_failure: str
    boot_fails: Callable[[str], bool]
    failed_spawn: Spawn
    boot_failed: list[str]
    deleted: list[str]
    preempted: list[str]
    _gone: list[Vm]
    _lock: threading.RLock
    _stop: threading.Event

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(0.05):
            self.reconcile()

    def reconcile(self) -> None:
        with self._lock:
            self._gone = [vm for vm in self._gone if vm.proc is not None and vm.proc.poll() is None]
            for g in list(self.groups.values()):
                self._reconcile(g)

    def _reconcile(self, g: Group) -> None:
        for vm in list(g.vms.values()):
            exited = vm.proc is not None and vm.proc.poll() is not None
            if vm.deleting:
                if vm.proc is None or exited:
                    del g.vms[vm.name]
            elif exited and self._left_terminated(g, vm):
                vm.terminated, vm.action = True, "NONE"
            elif exited and self.recreate:  # preempted or crashed: a MIG recreates it
                self.preempted.append(vm.name)
                vm.action, vm.recreated = "RECREATING", vm.recreated + 1
                vm.proc = self._start(g, vm)
            elif exited:
                del g.vms[vm.name]
            elif vm.proc is None and self.faults.creating(vm.name):
                pass  # on its way: no instance yet, no error either
            elif vm.proc is None:
                props = self._template(g.template)[1].get("properties", {})
                if (refused := self.images.disk_refusal(props)) is not None:
                    vm.error = refused  # never created; the group keeps trying
                elif refused := self.faults.creation_error(
                    vm.name, g.project, vm.zone, props, self._series_quota
                ):
                    vm.error = refused
                elif self._quota_left() >= self.cpus_per_vm:
                    vm.error = None
                    vm.proc = self._start(g, vm)
                else:  # the group retries creating it until quota frees up
                    vm.error = self._quota_error()
            else:
                vm.action = "NONE"
        alive = [vm for vm in g.vms.values() if not vm.deleting]
        for _ in range(g.target_size - len(alive)):
            name = f"{g.base_instance_name or g.name}-{secrets.token_hex(2)}"
            g.vms[name] = Vm(name, g.instance_zone())
        for vm in alive[g.target_size :]:  # a resize down: the MIG picks victims itself
            self._delete(vm)

    def _start(self, g: Group, vm: Vm) -> subprocess.Popen[Any]:
        if self.boot_fails(vm.name):
            self.boot_failed.append(vm.name)
            return self.failed_spawn(vm.name)
        if g is not self.group and self.shaped_spawn is not None:
            return self.shaped_spawn(vm.name, self.instance_metadata(g))
        return self.spawn(vm.name)

    def instance_metadata(self, g: Group) -> dict[str, str]:
        """The metadata a VM of ``g`` gets from its group's instance template."""
        _, template = self._template(g.template)
        items = template.get("properties", {}).get("metadata", {}).get("items", [])
        return {str(i["key"]): str(i["value"]) for i in items}

    def _quota_left(self) -> float:
        if self.cpu_quota is None:
            return float("inf")
        running = sum(
            1 for g in self.groups.values() for vm in g.vms.values() if vm.proc is not None
        )
        return self.cpu_quota - running * self.cpus_per_vm

    def _quota_error(self) -> dict[str, str]:
        return {
            "code": "QUOTA_EXCEEDED",
            "message": f"Quota 'CPUS' exceeded.  Limit: {float(self.cpu_quota or 0)} "
            f"in region {self.group.region}.",
        }

    def _delete(self, vm: Vm) -> None:
        vm.deleting, vm.action = True, "DELETING"
        self.deleted.append(vm.name)
        if vm.proc is not None and vm.proc.poll() is None:
            vm.proc.send_signal(signal.SIGTERM)

    def _left_terminated(self, g: Group, vm: Vm) -> bool:
        """A VM that powered itself off stays TERMINATED when its group says DO_NOTHING."""
        if vm.terminated:
            return True
        if vm.proc is None or vm.proc.poll() != POWERED_OFF:
            return False
        default = self.default_action_on_failure if g is self.group else "REPAIR"
        return failure_action(g.record, default) == "DO_NOTHING"

    def _series_quota(self, metric: str) -> tuple[float, float] | None:
        """A machine series' CPU quota in the region: (limit, free), None where it has none."""
        if metric not in self.quotas:
            return None
        limit, usage = self.quotas[metric]
        used = 0
        for g in self.groups.values():
            props = self._template(g.template)[1].get("properties", {})
            series, cpus = cpu_metric(str(props.get("machineType", "")))
            if series == metric:
                alive = [vm for vm in g.vms.values() if vm.proc is not None and not vm.terminated]
                used += cpus * len(alive)
        return limit, limit - usage - used
