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
down. The VMs and a group's reconcile are in tests/gcp/fake_vms.py, the group, region and
project endpoints in tests/gcp/fake_groups.py, ``fail_next``'s scripted answers in
tests/gcp/fake_scripted.py; this module routes the calls and serves them.

It refuses the way the documentation says the service does:

- at most 1,000 instances in one ``deleteInstances`` / ``abandonInstances`` request (400);
- a zonal group holds at most 1,000 VMs, a regional one 2,000 (a larger ``resize`` is a 400);
- ``listManagedInstances`` returns at most 500 a page (``maxResults``), with ``nextPageToken``;
- with ``cpu_quota`` set, VMs past the region's CPUS quota are never created: they stay
  ``CREATING`` with ``lastAttempt.errors`` ``QUOTA_EXCEEDED``, and start once quota frees up;
- with ``rate_limit`` set, each per-minute quota of the project (reads, lists, operation reads
  and writes, globally and per region) refuses calls past that many in one ``rate_window``
  (60 s) with 403 ``rateLimitExceeded`` (Compute Engine's rate-limit answer, not 429), until the
  next synchronized window on ``clock``; tests/gcp/fault_compute.py;
- with ``faults=FaultPlan(rate, seed)`` (tests/gcp/faults.py), any call may fail as Compute
  Engine's do (5xx, a rate-limited quota group, a timeout, a reset connection, an operation
  that pends and may end in error), new VMs may come late or hit a Spot stockout
  (``faults.stockouts`` names zones out of capacity), and a machine series past its own CPU
  quota (``N2_CPUS`` ...) is ``QUOTA_EXCEEDED``; ``deleteInstances`` refuses malformed or
  foreign instance URLs; a VM that powers itself off (exit status 75) is recreated under
  REPAIR and left TERMINATED under ``instanceLifecyclePolicy.defaultActionOnFailure``
  DO_NOTHING (``default_action_on_failure=`` for the deployment's group);
- templates, machine types and accelerator types: tests/gcp/fake_templates.py;
- an instance template is refused as the API refuses it: a name that is not RFC 1035 (400
  ``invalid``), a name already taken (409 ``alreadyExists``), GPUs (attached, or bundled with an
  accelerator-optimized machine type such as ``g2``) with ``onHostMaintenance`` other than
  ``TERMINATE`` (400 "Instances with guest accelerators do not support live migration."), and
  GPUs attached to a machine series other than ``n1``; templates and groups that do not exist
  are 404 ``notFound``; a GPU not in ``accelerators`` for the zone is 404;
- an instance template a group still uses cannot be deleted (400
  ``resourceInUseByAnotherResource``); a regional group's ``distributionPolicy`` may only name
  zones of its region (400);
- a VM whose boot disk is smaller than its image (``images.get`` / ``getFromFamily``, in
  tests/gcp/fake_images.py) is never created: ``lastAttempt.errors`` has the API's 400;
- a repeated ``requestId`` gets the first call's answer and nothing is done again (Compute
  ignores a request it has already completed); ``fail_next`` scripts exact faults (a status
  and reason, a reset connection, or an answer lost after the call was carried out);
- ``boot_fails(name)`` VMs run (instance ``RUNNING``) but their ``spawn`` is ``failed_spawn``:
  the VM is up, its worker never is.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlparse

from tests.gcp.fake_groups import GroupApi, region_quotas
from tests.gcp.fake_images import FakeImages, Image, default_images
from tests.gcp.fake_scripted import RESET, Scripted
from tests.gcp.fake_vms import Group, Spawn, Vm, paper, sleeper
from tests.gcp.fault_compute import (
    BASE,
    ComputeFaults,
    FakeServer,
    break_connection,
    quota_bucket,
)
from tests.gcp.fault_compute import api_error as _error
from tests.gcp.faults import FaultPlan

# What tests import from here; the pieces live in tests/gcp/fake_vms.py and fake_groups.py.
__all__ = ["RESET", "FakeCompute", "Group", "Spawn", "paper", "sleeper"]
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


class FakeCompute(GroupApi):
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
        rate_window: float = 60.0,
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
        images: list[Image] | None = None,
        faults: FaultPlan | None = None,
        default_action_on_failure: str = "REPAIR",
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
        self.rate_window = rate_window  # seconds of a rate quota's synchronized window
        self.clock = time.time  # rate windows and fault timing; a test may pin it
        self.faults = ComputeFaults(faults, lambda: self.clock())  # tests/gcp/fault_compute.py
        # the deployment group's instanceLifecyclePolicy.defaultActionOnFailure
        self.default_action_on_failure = default_action_on_failure
        self.boot_fails = boot_fails or (lambda name: False)
        self.failed_spawn = failed_spawn or sleeper
        self.machine_type = machine_type
        # regions.get quotas: metric -> (limit, usage); CPUS follows cpu_quota when set.
        self.quotas = quotas or region_quotas()
        self.accelerators = accelerators  # GPU types every zone offers (acceleratorTypes.get)
        self.zone_accelerators = zone_accelerators or {}  # zone -> its GPU types, where it differs
        # projects.get quotas (project-wide): metric -> (limit, usage)
        self.project_quotas = project_quotas or {"GPUS_ALL_REGIONS": (8.0, 0.0)}
        self.templates: dict[str, dict[str, Any]] = {}  # name -> the template as inserted
        # images.get / getFromFamily, and VMs whose boot disk is smaller than the image
        self.images = FakeImages(default_images(project) if images is None else images)
        self.deleted_groups: list[str] = []
        self.deleted_templates: list[str] = []
        self.denied = denied  # verbs (e.g. "deleteInstances") answered 403 permission denied
        self.rate_limited = 0  # requests refused for the rate limit
        self.boot_failed: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self._scripted: list[Scripted] = []  # faults a test asked for (fail_next)
        self._answered: dict[str, tuple[int, Any]] = {}  # requestId -> its first answer
        self.repeated: list[str] = []  # requestIds seen again (answered, not done twice)
        self.resizes: list[int] = []
        self.deleted: list[str] = []
        self.preempted: list[str] = []
        self.abandoned: list[Vm] = []
        self._gone: list[Vm] = []  # VMs of deleted groups, still shutting down
        self.now = lambda: datetime.now(UTC)  # creationTimestamp of what is inserted
        self._lock = threading.RLock()
        self._ops: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1_000_000)
        self._server = FakeServer(("127.0.0.1", 0), _handler(self))
        self._stop = threading.Event()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeCompute:
        """Serve the API and reconcile the groups, each in a thread of its own."""
        for target in (self._server.serve_forever, self._reconcile_loop):
            threading.Thread(target=target, daemon=True).start()
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

    def _rate_limited(self, method: str, path: str) -> bool:
        """Past the per-minute quota of the call's group (refilled at the next window)? A
        group the fault plan rate-limited is refused even with no ``rate_limit`` set."""
        limit = float("inf") if self.rate_limit is None else self.rate_limit
        bucket = quota_bucket(method, path)
        if self.faults.quota.admit(bucket, limit, self.rate_window, self.clock()):
            return False
        self.rate_limited += 1
        return True

    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        reason: str = "",
        *,
        times: int = 1,
        lost: bool = False,
    ) -> None:
        """Answer the next ``times`` calls of ``method`` on a path matching the regex ``path``
        with ``status`` (0: reset the connection, no answer) and ``reason``; with ``lost`` the
        call is carried out first and only its answer is lost."""
        with self._lock:
            self._scripted.append(Scripted(method, re.compile(path), status, reason, times, lost))

    def handle(self, method: str, raw_path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """A call's answer: scripted faults first, then a repeated ``requestId`` answered as
        Compute answers it (the first answer again, nothing done twice), then the call."""
        path = urlparse(raw_path).path
        rid = parse_qs(urlparse(raw_path).query).get("requestId", [""])[0]
        with self._lock:
            fault = next((f for f in self._scripted if f.matches(method, path)), None)
            if fault is not None:
                fault.times -= 1
                self._scripted = [f for f in self._scripted if f.times > 0]
                if not fault.lost:
                    self.requests.append((method, raw_path))
                    return fault.answer()
            if rid and rid in self._answered:
                self.requests.append((method, raw_path))
                self.repeated.append(rid)
                answer = self._answered[rid]
            else:
                answer = self._route(method, raw_path, body)
                if rid and answer[0] == 200:
                    self._answered[rid] = answer
            return fault.answer() if fault is not None else answer

    def _route(self, method: str, raw_path: str, body: dict[str, Any]) -> tuple[int, Any]:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, raw_path))
        with self._lock:
            fault = self.faults.current()
            early = self.faults.before(method, url.path, fault, self.rate_window, self._ops)
            if early is not None:
                return early
            if self._rate_limited(method, url.path):
                return _error(403, "Rate Limit Exceeded", reason="rateLimitExceeded")
            code, answer = self._call(method, url.path, query, body)
            return code, self.faults.after(method, url.path, fault, answer)

    def _call(
        self, method: str, path: str, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        url = urlparse(path)
        with self._lock:
            if method == "GET" and (image := self.images.handle(url.path)) is not None:
                return image
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


def _handler(fake: FakeCompute) -> type[BaseHTTPRequestHandler]:
    """The HTTP handler of ``fake``: a call's fault from the fault plan first, then its answer."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                body = {}
            fault = fake.faults.begin(method, self.path)  # the fault plan's, if any
            if fault == "reset":
                break_connection(self, fault, fake.faults.plan, fake._stop)
                return
            fake.faults.hold(self.path, fake._stop)
            code, payload = fake.handle(method, self.path, body)
            if fault == "timeout":  # carried out, and then the answer never comes
                break_connection(self, fault, fake.faults.plan, fake._stop)
                return
            if code == RESET:  # a reset connection: no answer at all
                self.close_connection = True
                return
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
