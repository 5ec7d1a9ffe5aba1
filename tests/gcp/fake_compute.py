"""A fake of the Compute Engine REST API's managed instance groups, with processes for VMs.

Compute Engine has no emulator, so this serves the few endpoints CFlow calls, in the real JSON
format, and the real ``google-cloud-compute`` client (and the worker's plain REST call) talk to
it through ``CFLOW_COMPUTE_ENDPOINT``:

- ``instanceGroupManagers`` (zonal) and ``regionInstanceGroupManagers``: ``get``, ``resize``,
  ``listManagedInstances`` (paged), ``deleteInstances``, ``abandonInstances``;
- ``zoneOperations`` / ``regionOperations``: ``get`` and ``wait`` (operations finish at once);
- ``regions.get`` (quotas), ``instanceTemplates.get`` and ``machineTypes.get``, for ``doctor``;
- for machine shapes: ``instanceTemplates.insert`` / ``delete``, ``acceleratorTypes.get``,
  ``projects.get`` (project-wide quotas such as ``GPUS_ALL_REGIONS``),
  ``instanceGroupManagers`` and ``regionInstanceGroupManagers`` ``insert`` / ``list`` /
  ``delete``, and ``globalOperations.get`` / ``wait``. A shaped group is a group like the
  deployment's: it keeps its target size of VMs, each made by ``shaped_spawn(name, metadata)``
  with the instance metadata of the group's template (so a test's worker pulls the subscription
  the template names), or by ``spawn(name)`` when no ``shaped_spawn`` is given.

Each "VM" is a process made by ``spawn(name)``; like a MIG, the fake keeps ``targetSize``
instances, recreates one whose process died without being deleted (a Spot preemption), and
"deletes" by SIGTERM. Every request is logged, so tests can assert the group was never resized
down.

It refuses the way the documentation says the service does:

- at most 1,000 instances in one ``deleteInstances`` / ``abandonInstances`` request (400);
- a zonal group holds at most 1,000 VMs, a regional one 2,000 (a larger ``resize`` is a 400);
- ``listManagedInstances`` returns at most 500 a page (``maxResults``), with ``nextPageToken``;
- with ``cpu_quota`` set, VMs past the region's CPUS quota are never created: they stay
  ``CREATING`` with ``lastAttempt.errors`` ``QUOTA_EXCEEDED``, and start once quota frees up;
- with ``rate_limit`` set, requests past that many a ``rate_window`` get 403
  ``rateLimitExceeded`` (Compute Engine's rate-limit answer, not 429);
- an instance template is refused as the API refuses it: a name that is not RFC 1035 (400
  ``invalid``), a name already taken (409 ``alreadyExists``), GPUs (attached, or bundled with an
  accelerator-optimized machine type such as ``g2``) with ``onHostMaintenance`` other than
  ``TERMINATE`` (400 "Instances with guest accelerators do not support live migration."), and
  GPUs attached to a machine series other than ``n1``; templates and groups that do not exist
  are 404 ``notFound``; a GPU not in ``accelerators`` for the zone is 404;
- an instance template a group still uses cannot be deleted (400
  ``resourceInUseByAnotherResource``); a regional group's ``distributionPolicy`` may only name
  zones of its region (400);
- ``boot_fails(name)`` VMs run (instance ``RUNNING``) but their ``spawn`` is ``failed_spawn``:
  the VM is up, its worker never is.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

Spawn = Callable[[str], subprocess.Popen[Any]]
BASE = "https://www.googleapis.com/compute/v1"
DELETE_LIMIT = 1000  # instances per deleteInstances / abandonInstances request
ZONAL_LIMIT, REGIONAL_LIMIT = 1000, 2000  # VMs a group can hold
PAGE_LIMIT = 500  # listManagedInstances maxResults: default and most
_REGION_PATH = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)/regions/(?P<region>[^/]+)$")
_TEMPLATE_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/global/instanceTemplates/(?P<name>[^/]+)$"
)
_TEMPLATES_PATH = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)/global/instanceTemplates$")
_GROUPS_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/(?P<scope>zones|regions)/(?P<where>[^/]+)/"
    r"instanceGroupManagers$"
)
_PROJECT_PATH = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)$")
_ACCELERATOR_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/acceleratorTypes/(?P<name>[^/]+)$"
)
_GLOBAL_OPERATION_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/global/operations/(?P<name>[^/]+?)(?:/wait)?$"
)
_NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
# Accelerator-optimized machine types come with their GPUs: type -> (accelerator, count).
G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 24: 2, 32: 1, 48: 4, 96: 8}
_MACHINE_TYPE_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/machineTypes/(?P<name>[^/]+)$"
)
_GROUP_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/(?P<scope>zones|regions)/(?P<where>[^/]+)/"
    r"instanceGroupManagers/(?P<group>[^/]+)(?:/(?P<verb>[A-Za-z]+))?$"
)
_OPERATION_PATH = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/(?P<scope>zones|regions)/(?P<where>[^/]+)/"
    r"operations/(?P<name>[^/]+?)(?:/(?P<verb>wait))?$"
)


@dataclass
class Vm:
    name: str
    zone: str
    proc: subprocess.Popen[Any] | None = None
    action: str = "CREATING"
    deleting: bool = False
    recreated: int = 0
    error: dict[str, str] | None = None  # lastAttempt's error while it cannot be created


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


class FakeCompute:
    """The fake API in a thread; ``endpoint`` is what ``CFLOW_COMPUTE_ENDPOINT`` should be."""

    def __init__(
        self,
        *,
        project: str,
        group: str,
        spawn: Spawn,
        zone: str | None = "us-central1-a",
        region: str | None = None,
        recreate: bool = True,
        cpu_quota: int | None = None,
        cpus_per_vm: int = 2,
        rate_limit: int | None = None,
        rate_window: float = 1.0,
        boot_fails: Callable[[str], bool] | None = None,
        failed_spawn: Spawn | None = None,
        machine_type: str = "e2-standard-2",
        quotas: dict[str, tuple[float, float]] | None = None,
        denied: frozenset[str] = frozenset(),
        accelerators: frozenset[str] = frozenset({"nvidia-tesla-t4", "nvidia-l4"}),
        zone_accelerators: dict[str, frozenset[str]] | None = None,
        project_quotas: dict[str, tuple[float, float]] | None = None,
        metadata: dict[str, str] | None = None,
        shaped_spawn: Callable[[str, dict[str, str]], subprocess.Popen[Any]] | None = None,
    ):
        scope, where = ("zones", zone) if zone else ("regions", region)
        assert where, "a zone or a region"
        self.group = Group(project, scope, where, group, template=f"{group}-template")
        self.groups: dict[str, Group] = {group: self.group}  # the deployment's and shaped ones
        self.spawn = spawn
        self.shaped_spawn = shaped_spawn
        # The deployment template's metadata (the stack sets cflow-subscription and the rest).
        self.metadata = {"cflow-group": group, **(metadata or {})}
        self.recreate = recreate
        self.cpu_quota = cpu_quota
        self.cpus_per_vm = cpus_per_vm
        self.rate_limit = rate_limit
        self.rate_window = rate_window
        self.boot_fails = boot_fails or (lambda name: False)
        self.failed_spawn = failed_spawn or sleeper
        self.machine_type = machine_type
        # regions.get quotas: metric -> (limit, usage); CPUS follows cpu_quota when set.
        self.quotas = quotas or {
            "CPUS": (24.0, 0.0),
            "PREEMPTIBLE_CPUS": (0.0, 0.0),
            "DISKS_TOTAL_GB": (4096.0, 0.0),
            "SSD_TOTAL_GB": (500.0, 0.0),
            "IN_USE_ADDRESSES": (8.0, 0.0),
        }
        self.accelerators = accelerators  # GPU types every zone offers (acceleratorTypes.get)
        self.zone_accelerators = zone_accelerators or {}  # zone -> its GPU types, where it differs
        # projects.get quotas (project-wide): metric -> (limit, usage)
        self.project_quotas = project_quotas or {"GPUS_ALL_REGIONS": (8.0, 0.0)}
        self.templates: dict[str, dict[str, Any]] = {}  # name -> the template as inserted
        self.deleted_groups: list[str] = []
        self.deleted_templates: list[str] = []
        self.denied = denied  # verbs (e.g. "deleteInstances") answered 403 permission denied
        self.rate_limited = 0  # requests refused for the rate limit
        self.boot_failed: list[str] = []
        self._recent: list[float] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.resizes: list[int] = []
        self.deleted: list[str] = []
        self.preempted: list[str] = []
        self.abandoned: list[Vm] = []
        self._gone: list[Vm] = []  # VMs of deleted groups, still shutting down
        self.now = lambda: datetime.now(UTC)  # creationTimestamp of what is inserted
        self._lock = threading.RLock()
        self._ops: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1_000_000)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._threads = [
            threading.Thread(target=self._server.serve_forever, daemon=True),
            threading.Thread(target=self._reconcile_loop, daemon=True),
        ]
        self._stop = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeCompute:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            vms = [vm for g in self.groups.values() for vm in g.vms.values()]
            vms += [*self._gone, *self.abandoned]
            procs = [vm.proc for vm in vms if vm.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    # -- what tests look at --------------------------------------------------------------

    @property
    def made_groups(self) -> dict[str, dict[str, Any]]:
        """Shaped groups: name -> the group as inserted (with its target size now)."""
        with self._lock:
            return {
                name: {**g.record, "targetSize": g.target_size}
                for name, g in self.groups.items()
                if g is not self.group
            }

    def live(self, group: str | None = None) -> dict[str, subprocess.Popen[Any]]:
        """Instances whose process runs now (of every group, or of ``group``): name -> process."""
        with self._lock:
            return {
                vm.name: vm.proc
                for g in self.groups.values()
                if group is None or g.name == group
                for vm in g.vms.values()
                if vm.proc is not None and vm.proc.poll() is None
            }

    def is_empty(self, group: str | None = None) -> bool:
        with self._lock:
            g = self.groups.get(group or self.group.name)
            return g is None or (g.target_size == 0 and not g.vms)

    def resized_down(self) -> bool:
        """Whether any resize lowered the target size (CFlow must only delete by name)."""
        return any(b < a for a, b in itertools.pairwise([0, *self.resizes]))

    # -- the group's behaviour ----------------------------------------------------------

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
            elif exited and self.recreate:  # preempted or crashed: a MIG recreates it
                self.preempted.append(vm.name)
                vm.action, vm.recreated = "RECREATING", vm.recreated + 1
                vm.proc = self._start(g, vm)
            elif exited:
                del g.vms[vm.name]
            elif vm.proc is None:
                if self._quota_left() >= self.cpus_per_vm:
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

    # -- the REST API ---------------------------------------------------------------------

    def _operation(self, kind: str, target: str, g: Group | None = None) -> dict[str, Any]:
        g = g or self.group
        op_id = next(self._ids)
        name = f"operation-{op_id}-{secrets.token_hex(4)}"
        scope_key = "zone" if g.scope == "zones" else "region"
        op = {
            "kind": "compute#operation",
            "id": str(op_id),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "status": "DONE",
            "progress": 100,
            "insertTime": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            scope_key: f"{BASE}/projects/{g.project}/{g.scope}/{g.where}",
            "selfLink": f"{BASE}/projects/{g.project}/{g.scope}/{g.where}/operations/{name}",
        }
        self._ops[name] = op
        return op

    def _managed(self, g: Group, vm: Vm) -> dict[str, Any]:
        alive = vm.proc is not None and vm.proc.poll() is None
        status = "STOPPING" if vm.deleting else ("RUNNING" if alive else "STAGING")
        managed: dict[str, Any] = {
            "instance": g.instance_url(vm),
            "name": vm.name,
            "id": str(abs(hash(vm.name)) % 10**18),
            "currentAction": vm.action,
        }
        if vm.proc is not None or vm.deleting:  # an instance never created has no status
            managed["instanceStatus"] = status
        if vm.error is not None:
            managed["lastAttempt"] = {"errors": {"errors": [vm.error]}}
        return managed

    def _rate_limited(self) -> bool:
        if self.rate_limit is None:
            return False
        now = time.monotonic()
        self._recent = [t for t in self._recent if now - t < self.rate_window]
        if len(self._recent) >= self.rate_limit:
            self.rate_limited += 1
            return True
        self._recent.append(now)
        return False

    def handle(self, method: str, raw_path: str, body: dict[str, Any]) -> tuple[int, Any]:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, raw_path))
        with self._lock:
            if self._rate_limited():
                return _error(403, "Rate Limit Exceeded", reason="rateLimitExceeded")
            if m := _PROJECT_PATH.match(url.path):
                return 200, self._project(m["project"])
            if m := _REGION_PATH.match(url.path):
                return 200, self._region(m["region"])
            if (m := _TEMPLATE_PATH.match(url.path)) and method == "DELETE":
                return self._delete_template(m["name"])
            if m := _TEMPLATE_PATH.match(url.path):
                return self._template(m["name"])
            if (m := _TEMPLATES_PATH.match(url.path)) and method == "POST":
                return self._insert_template(body)
            if m := _ACCELERATOR_PATH.match(url.path):
                return self._accelerator(m["zone"], m["name"])
            if m := _GLOBAL_OPERATION_PATH.match(url.path):
                if (op := self._ops.get(m["name"])) is None:
                    return _error(404, f"The resource operation '{m['name']}' was not found")
                return 200, op
            if (m := _GROUPS_PATH.match(url.path)) and method == "POST":
                return self._insert_group(m["scope"], m["where"], body)
            if m := _GROUPS_PATH.match(url.path):
                return 200, self._list_groups(m["scope"], m["where"])
            if m := _MACHINE_TYPE_PATH.match(url.path):
                return self._machine_type(m["zone"], m["name"])
            if m := _OPERATION_PATH.match(url.path):
                op = self._ops.get(m["name"])
                scope_key = "zone" if m["scope"] == "zones" else "region"
                where = f"{BASE}/projects/{m['project']}/{m['scope']}/{m['where']}"
                if op is None or op.get(scope_key) != where:
                    return _error(404, f"The resource operation '{m['name']}' was not found")
                return 200, op
            m = _GROUP_PATH.match(url.path)
            if m is None:
                return _error(404, f"no such endpoint {url.path}")
            g = self.groups.get(m["group"])
            if g is None or (m["project"], m["scope"], m["where"]) != (g.project, g.scope, g.where):
                resource = f"projects/{m['project']}/{m['scope']}/{m['where']}"
                return _error(
                    404,
                    f"The resource '{resource}/instanceGroupManagers/{m['group']}' was not found",
                )
            return self._group_call(g, method, m["verb"], query, body)

    def _group_call(
        self, g: Group, method: str, verb: str | None, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        if verb in self.denied:
            return _error(
                403,
                "Required 'compute.instanceGroupManagers.update' permission for "
                f"'projects/{g.project}/{g.scope}/{g.where}/instanceGroupManagers/{g.name}'",
            )
        if method == "GET" and verb is None:
            return 200, self._describe(g)
        if method == "DELETE" and verb is None:  # the group goes, and every VM with it
            for vm in g.vms.values():
                if not vm.deleting:
                    self._delete(vm)
            self._gone.extend(g.vms.values())
            del self.groups[g.name]
            self.deleted_groups.append(g.name)
            return 200, self._operation("compute.instanceGroupManagers.delete", g.self_link, g)
        if method == "POST" and verb == "resize":
            size = int(query["size"])
            if size > g.size_limit:
                return _error(
                    400,
                    f"Invalid value for field 'size': '{size}'. "
                    f"Must be less than or equal to {g.size_limit}.",
                )
            (self.resizes if g is self.group else g.resizes).append(size)
            g.target_size = size
            self._reconcile(g)
            return 200, self._operation("compute.instanceGroupManagers.resize", g.self_link, g)
        if method == "POST" and verb == "listManagedInstances":
            vms = sorted(g.vms.values(), key=lambda vm: vm.name)
            page = min(int(query.get("maxResults", PAGE_LIMIT)), PAGE_LIMIT)
            start = int(query.get("pageToken") or 0)
            out: dict[str, Any] = {
                "managedInstances": [self._managed(g, vm) for vm in vms[start : start + page]]
            }
            if start + page < len(vms):
                out["nextPageToken"] = str(start + page)
            return 200, out
        if method == "POST" and verb in ("deleteInstances", "abandonInstances"):
            urls = body.get("instances", [])
            if len(urls) > DELETE_LIMIT:
                return _error(
                    400,
                    f"Invalid value for field 'resource.instances': {len(urls)} instances. "
                    f"At most {DELETE_LIMIT} instances can be specified in one request.",
                )
            skip = bool(body.get("skipInstancesOnValidationError"))
            names = [u.rsplit("/", 1)[-1] for u in urls]
            unknown = [n for n in names if n not in g.vms or g.vms[n].deleting]
            if unknown and not skip:
                return _error(400, f"Instances {unknown} are not members of the group")
            for name in names:
                if name not in unknown:
                    if verb == "deleteInstances":
                        self._delete(g.vms[name])
                    else:
                        self.abandoned.append(g.vms.pop(name))
                    g.target_size -= 1
            return 200, self._operation(f"compute.instanceGroupManagers.{verb}", g.self_link, g)
        return _error(400, f"unsupported {method} {verb}")

    def _describe(self, g: Group) -> dict[str, Any]:
        template = f"{BASE}/projects/{g.project}/global/instanceTemplates/{g.template}"
        scope_key = "zone" if g.scope == "zones" else "region"
        if g is not self.group:
            return {**g.record, "targetSize": g.target_size}
        return {
            "kind": "compute#instanceGroupManager",
            "id": "4242",
            "name": g.name,
            "baseInstanceName": g.name,
            "targetSize": g.target_size,
            "selfLink": g.self_link,
            "instanceTemplate": template,
            "versions": [{"name": "worker", "instanceTemplate": template}],
            "status": {"isStable": all(vm.action == "NONE" for vm in g.vms.values())},
            scope_key: f"{BASE}/projects/{g.project}/{g.scope}/{g.where}",
        }

    def _list_groups(self, scope: str, where: str) -> dict[str, Any]:
        items = [
            self._describe(g)
            for g in sorted(self.groups.values(), key=lambda g: g.name)
            if (g.scope, g.where) == (scope, where)
        ]
        return {"kind": "compute#instanceGroupManagerList", "items": items}

    def _project(self, project: str) -> dict[str, Any]:
        return {
            "kind": "compute#project",
            "name": project,
            "quotas": [
                {"metric": metric, "limit": limit, "usage": usage}
                for metric, (limit, usage) in self.project_quotas.items()
            ],
        }

    def _region(self, region: str) -> dict[str, Any]:
        quotas = dict(self.quotas)
        if self.cpu_quota is not None:
            quotas["CPUS"] = (float(self.cpu_quota), quotas.get("CPUS", (0.0, 0.0))[1])
        return {
            "kind": "compute#region",
            "name": region,
            "status": "UP",
            "zones": [f"{BASE}/projects/{self.group.project}/zones/{z}" for z in _zones(region)],
            "quotas": [
                {"metric": metric, "limit": limit, "usage": usage}
                for metric, (limit, usage) in quotas.items()
            ],
        }

    def _template(self, name: str) -> tuple[int, Any]:
        if name in self.templates:
            return 200, self.templates[name]
        project = self.group.project
        if name != f"{self.group.name}-template" or name in self.deleted_templates:
            resource = f"projects/{project}/global/instanceTemplates/{name}"
            return _error(404, f"The resource '{resource}' was not found")
        return 200, {
            "kind": "compute#instanceTemplate",
            "name": name,
            "selfLink": f"{BASE}/projects/{project}/global/instanceTemplates/{name}",
            "properties": {
                "machineType": self.machine_type,
                "scheduling": {
                    "provisioningModel": "SPOT",
                    "preemptible": True,
                    "automaticRestart": False,
                    "onHostMaintenance": "TERMINATE",
                    "instanceTerminationAction": "DELETE",
                },
                "metadata": {"items": [{"key": k, "value": v} for k, v in self.metadata.items()]},
                "shieldedInstanceConfig": {
                    "enableSecureBoot": True,
                    "enableVtpm": True,
                    "enableIntegrityMonitoring": True,
                },
                "disks": [
                    {
                        "boot": True,
                        "initializeParams": {
                            "diskSizeGb": "20",
                            "diskType": "pd-balanced",
                            "sourceImage": f"{BASE}/projects/{project}/global/images/cflow-1",
                        },
                    }
                ],
            },
        }

    def _delete_template(self, name: str) -> tuple[int, Any]:
        project = self.group.project
        resource = f"projects/{project}/global/instanceTemplates/{name}"
        if name not in self.templates:
            return _error(404, f"The resource '{resource}' was not found")
        users = [g for g in self.groups.values() if g.template == name]
        if users:
            user = users[0]
            return _error(
                400,
                f"The instance_template resource '{resource}' is already being used by "
                f"'projects/{project}/{user.scope}/{user.where}/instanceGroupManagers/"
                f"{user.name}'",
                reason="resourceInUseByAnotherResource",
            )
        del self.templates[name]
        self.deleted_templates.append(name)
        link = f"{BASE}/{resource}"
        return 200, self._global_operation("compute.instanceTemplates.delete", link)

    def _machine_type(self, zone: str, name: str) -> tuple[int, Any]:
        m = re.fullmatch(r"([a-z0-9]+)-(?:standard|highmem|highcpu)-(\d+)", name)
        if m is None or (m[1] == "g2" and int(m[2]) not in G2_GPUS):
            resource = f"projects/{self.group.project}/zones/{zone}/machineTypes/{name}"
            return _error(404, f"The resource '{resource}' was not found")
        found: dict[str, Any] = {
            "kind": "compute#machineType",
            "name": name,
            "guestCpus": int(m[2]),
        }
        if m[1] == "g2":
            found["accelerators"] = [
                {"guestAcceleratorType": "nvidia-l4", "guestAcceleratorCount": G2_GPUS[int(m[2])]}
            ]
        return 200, found

    def _accelerator(self, zone: str, name: str) -> tuple[int, Any]:
        if name not in self.zone_accelerators.get(zone, self.accelerators):
            resource = f"projects/{self.group.project}/zones/{zone}/acceleratorTypes/{name}"
            return _error(404, f"The resource '{resource}' was not found")
        return 200, {"kind": "compute#acceleratorType", "name": name, "maximumCardsPerInstance": 8}

    def _global_operation(self, kind: str, target: str) -> dict[str, Any]:
        op = self._operation(kind, target)
        op.pop("zone", None)
        op.pop("region", None)
        op["selfLink"] = f"{BASE}/projects/{self.group.project}/global/operations/{op['name']}"
        return op

    def _insert_template(self, body: dict[str, Any]) -> tuple[int, Any]:
        name = str(body.get("name", ""))
        project = self.group.project
        if not _NAME.fullmatch(name):
            return _error(
                400,
                f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            )
        link = f"{BASE}/projects/{project}/global/instanceTemplates/{name}"
        if name in self.templates or name == f"{self.group.name}-template":
            resource = f"projects/{project}/global/instanceTemplates/{name}"
            return _error(409, f"The resource '{resource}' already exists", reason="alreadyExists")
        props = body.get("properties", {})
        machine_type = str(props.get("machineType", ""))
        gpus = props.get("guestAccelerators") or []
        bundled = machine_type.startswith("g2-")
        maintenance = props.get("scheduling", {}).get("onHostMaintenance", "MIGRATE")
        if (gpus or bundled) and maintenance != "TERMINATE":
            return _error(
                400,
                "Instances with guest accelerators do not support live migration.",
                reason="badRequest",
            )
        if gpus and not machine_type.startswith("n1-"):
            return _error(
                400,
                f"Invalid resource usage: 'Machine type {machine_type} does not support "
                "accelerators.'",
            )
        self.templates[name] = {"kind": "compute#instanceTemplate", **body, "selfLink": link}
        return 200, self._global_operation("compute.instanceTemplates.insert", link)

    def _insert_group(self, scope: str, where: str, body: dict[str, Any]) -> tuple[int, Any]:
        name = str(body.get("name", ""))
        project = self.group.project
        resource = f"projects/{project}/{scope}/{where}/instanceGroupManagers/{name}"
        if not _NAME.fullmatch(name):
            return _error(400, f"Invalid value for field 'resource.name': '{name}'.")
        if name in self.groups:
            return _error(409, f"The resource '{resource}' already exists", reason="alreadyExists")
        template = str(body.get("instanceTemplate", "")).rsplit("/", 1)[-1]
        if template not in self.templates:
            missing = f"projects/{project}/global/instanceTemplates/{template}"
            return _error(404, f"The resource '{missing}' was not found")
        zones: list[str] = []
        if scope == "regions":
            wanted = body.get("distributionPolicy", {}).get("zones") or []
            zones = [str(z.get("zone", "")).rsplit("/", 1)[-1] for z in wanted]
            stray = [z for z in zones if z not in _zones(where)]
            if stray:
                return _error(
                    400,
                    f"Invalid value for field 'resource.distributionPolicy.zones': "
                    f"zone '{stray[0]}' is not in region '{where}'.",
                )
        elif "distributionPolicy" in body:
            return _error(400, "A zonal instance group manager has no distributionPolicy.")
        link = f"{BASE}/{resource}"
        scope_key = "zone" if scope == "zones" else "region"
        record = {
            "kind": "compute#instanceGroupManager",
            **body,
            "targetSize": int(body.get("targetSize", 0)),
            scope_key: f"{BASE}/projects/{project}/{scope}/{where}",
            "selfLink": link,
            "creationTimestamp": self.now().isoformat(timespec="milliseconds"),
        }
        group = Group(
            project,
            scope,
            where,
            name,
            target_size=int(body.get("targetSize", 0)),
            template=template,
            base_instance_name=str(body.get("baseInstanceName") or name),
            zones=zones or (_zones(where) if scope == "regions" else []),
            record=record,
        )
        self.groups[name] = group
        return 200, self._operation("compute.instanceGroupManagers.insert", link, group)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except ValueError:
                    body = {}
                code, payload = fake.handle(method, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _zones(region: str) -> list[str]:
    """The zones ``regions.get`` lists for a region (a fake's: b, c and f)."""
    return [f"{region}-{z}" for z in "bcf"]


def _error(code: int, message: str, *, reason: str | None = None) -> tuple[int, Any]:
    reason = reason or {
        404: "notFound",
        400: "invalid",
        403: "forbidden",
        409: "alreadyExists",
    }.get(code, "backendError")
    domain = "usageLimits" if reason == "rateLimitExceeded" else "global"
    return code, {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": domain, "reason": reason}],
        }
    }


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
