"""A managed instance group of Spot VMs on virtual time, behind the runner's :class:`Fleet`.

``grow`` raises the group's size: each new VM is billed from that moment, boots, runs its
startup script and starts a worker. ``delete`` removes VMs by name (and lowers the size): the
worker gets SIGTERM, nacks what it was running, and the VM is gone a few seconds later. A Spot
preemption gives the worker the same SIGTERM but only ``shutdown_window`` seconds, and sometimes
the worker never gets to nack; the group keeps its size, so it recreates the VM under the same
name once it notices.

Statuses are what :func:`runner.backends.gcp.instances.instance_status` makes of the group's
listing: a VM is ``running`` from the moment it runs (so while it boots and installs, too),
``stopping`` only while the group deletes it, and ``starting`` while the group creates or
recreates it and while a preempted VM shuts down (no group action yet, the instance not
RUNNING).

Two ways a VM never works, as :class:`runner.backends.gcp.fleet.GceFleet` reports them: past the
region's quota (``VmModel.quota_vms``) the group cannot create it, so it stays ``starting``,
unbilled, with a ``QUOTA_EXCEEDED`` error until quota frees up; and a VM whose boot fails
(``VmModel.boot_fail_rate``) runs, billed, with no worker: it reports itself (``removable``, so
the runner deletes it) and removes itself from the group after ``boot_fail_seconds``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from runner.engine.fleet import Fleet, Instance
from runner.sim.worker import SimWorker
from runner.sim.world import VmModel, World

_STATUS = {
    "creating": "starting",  # the group's CREATING action
    "booting": "running",  # the instance is RUNNING; its startup script installs the worker
    "running": "running",
    "preempting": "starting",  # instance STOPPING, no group action yet
    "deleting": "stopping",  # the group's DELETING action
    "recreating": "starting",  # the group's RECREATING action
    "blocked": "starting",  # the group cannot create it: no quota (lastAttempt.errors)
    "failed": "running",  # booted, but the startup script failed: no worker
}
QUOTA_ERROR = "QUOTA_EXCEEDED: Quota 'CPUS' exceeded."
BOOT_ERROR = "failed to boot: E: Unable to fetch some archives"


@dataclass
class SimVm:
    name: str
    state: str = "creating"  # one of _STATUS
    incarnation: int = 0
    span: int = -1  # the ledger's index of the current incarnation
    worker: SimWorker | None = None
    deleting: bool = False


class SimFleet(Fleet):
    def __init__(self, world: World, *, name_prefix: str = "cflow", model: VmModel | None = None):
        self.world = world
        self.model = model or world.vm  # a second group (standard VMs) has its own
        self.name_prefix = name_prefix
        self._vms: dict[str, SimVm] = {}
        self._serial = 0
        self.counts = {k: 0 for k in ("created", "preempted", "deleted", "self_deleted")}
        self.counts |= {"recreated": 0, "crashed": 0, "api_lists": 0}
        self.counts |= {"boot_failed": 0, "quota_blocked": 0}

    # -- Fleet -------------------------------------------------------------------------------

    def instances(self) -> list[Instance]:
        self.counts["api_lists"] += 1
        out = []
        for vm in self._vms.values():
            error = {"blocked": QUOTA_ERROR, "failed": BOOT_ERROR}.get(vm.state)
            out.append(
                Instance(vm.name, _STATUS[vm.state], error=error, removable=vm.state == "failed")
            )
        return out

    def grow(self, count: int) -> list[str]:
        names = []
        for _ in range(count):
            self._serial += 1
            vm = SimVm(f"{self.name_prefix}-{self._serial:05d}")
            self._vms[vm.name] = vm
            self._incarnate(vm)
            names.append(vm.name)
        return names

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            vm = self._vms.get(name)
            if vm is not None and not vm.deleting:
                self.counts["deleted"] += 1
                self._remove(vm)

    def wait_empty(self, timeout: float) -> bool:
        clock = self.world.clock
        deadline = clock.now + timeout
        while self._vms and clock.now < deadline:
            clock.sleep(min(1.0, deadline - clock.now))
        return not self._vms

    # -- what the simulator reads --------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._vms)

    def billed(self) -> int:
        return sum(1 for vm in self._vms.values() if vm.state not in ("recreating", "blocked"))

    def busy(self) -> int:
        return sum(1 for vm in self._vms.values() if vm.worker is not None and vm.worker.busy)

    # -- the life of a VM ----------------------------------------------------------------------

    def _incarnate(self, vm: SimVm) -> None:
        world = self.world
        vm.incarnation += 1
        vm.worker = None
        quota = self.model.quota_vms
        created = sum(
            1
            for v in self._vms.values()
            if v is not vm and v.state not in ("blocked", "recreating")
        )
        if quota is not None and created >= quota:
            if vm.state != "blocked":
                self.counts["quota_blocked"] += 1
            vm.state = "blocked"  # not created, not billed: the group retries
            inc = vm.incarnation
            world.clock.after(self.model.quota_retry_seconds, lambda: self._retry(vm, inc))
            return
        vm.state = "creating"
        vm.span = world.ledger.open_vm(vm.name, world.clock.now)
        self.counts["created"] += 1
        inc, model, rng = vm.incarnation, self.model, world.rng
        world.clock.after(model.draw(rng, model.create_seconds), lambda: self._run(vm, inc))
        if model.preempt_per_hour > 0:
            hazard = rng.expovariate(model.preempt_per_hour / 3600.0)
            world.clock.after(hazard, lambda: self._preempt(vm, inc))

    def _run(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation == inc and vm.state == "creating":
            vm.state = "booting"
            model = self.model
            ready = model.draw(self.world.rng, model.boot_seconds + model.install_seconds)
            self.world.clock.after(ready, lambda: self._boot(vm, inc))

    def _retry(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation == inc and vm.state == "blocked" and not vm.deleting:
            self._incarnate(vm)

    def _boot(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation == inc and vm.state == "booting":
            if self.world.rng.random() < self.model.boot_fail_rate:
                self.counts["boot_failed"] += 1
                vm.state = "failed"  # reports itself; its startup script removes it
                self.world.clock.after(
                    self.model.boot_fail_seconds, lambda: self._boot_failed(vm, inc)
                )
                return
            vm.state = "running"
            self._start_worker(vm, inc)

    def _boot_failed(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation == inc and vm.state == "failed" and not vm.deleting:
            self._self_delete(vm)

    def _start_worker(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation != inc or vm.state != "running":
            return
        vm.worker = SimWorker(
            self.world,
            vm.name,
            vm.span,
            on_exit=lambda: self._self_delete(vm),
            on_crash=lambda: self._restart(vm, inc),
        )
        vm.worker.start()

    def _restart(self, vm: SimVm, inc: int) -> None:
        self.counts["crashed"] += 1
        self.world.clock.after(self.model.restart_seconds, lambda: self._start_worker(vm, inc))

    def _preempt(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation != inc or vm.state not in ("creating", "booting", "running"):
            return
        world = self.world
        self.counts["preempted"] += 1
        vm.state = "preempting"
        if vm.worker is not None:
            vm.worker.terminate(clean=world.rng.random() >= self.model.lost_stop_rate)
        world.clock.after(self.model.shutdown_window, lambda: self._gone(vm, inc))

    def _self_delete(self, vm: SimVm) -> None:
        if not vm.deleting:
            self.counts["self_deleted"] += 1
            self._remove(vm)

    def _remove(self, vm: SimVm) -> None:
        vm.deleting = True
        if vm.state in ("recreating", "blocked"):  # never created: nothing to bill or stop
            del self._vms[vm.name]
            return
        if vm.state == "preempting":
            return  # going anyway; _gone drops it from the group instead of recreating it
        vm.state = "deleting"
        if vm.worker is not None:
            vm.worker.terminate(clean=True)
        inc, world = vm.incarnation, self.world
        world.clock.after(self.model.delete_seconds, lambda: self._gone(vm, inc))

    def _gone(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation != inc or vm.state not in ("preempting", "deleting"):
            return
        world = self.world
        preempted = vm.state == "preempting"
        world.ledger.close_vm(vm.span, world.clock.now, preempted=preempted)
        vm.worker = None
        if preempted and not vm.deleting:
            vm.state = "recreating"
            world.clock.after(self.model.recreate_seconds, lambda: self._recreate(vm, inc))
        else:
            del self._vms[vm.name]

    def _recreate(self, vm: SimVm, inc: int) -> None:
        if vm.incarnation == inc and vm.state == "recreating" and not vm.deleting:
            self.counts["recreated"] += 1
            self._incarnate(vm)
