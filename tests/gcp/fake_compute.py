"""A fake of the Compute Engine REST API's managed instance groups, with processes for VMs.

Compute Engine has no emulator, so this serves the few endpoints CFlow calls, in the real JSON
format, and the real ``google-cloud-compute`` client (and the worker's plain REST call) talk to
it through ``CFLOW_COMPUTE_ENDPOINT``:

- ``instanceGroupManagers`` (zonal) and ``regionInstanceGroupManagers``: ``get``, ``resize``,
  ``listManagedInstances``, ``deleteInstances``;
- ``zoneOperations`` / ``regionOperations``: ``get`` and ``wait`` (operations finish at once).

Each "VM" is a process made by ``spawn(name)``; like a MIG, the fake keeps ``targetSize``
instances, recreates one whose process died without being deleted (a Spot preemption), and
"deletes" by SIGTERM. Every request is logged, so tests can assert the group was never resized
down.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

Spawn = Callable[[str], subprocess.Popen[Any]]
BASE = "https://www.googleapis.com/compute/v1"
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


@dataclass
class Group:
    project: str
    scope: str  # "zones" | "regions"
    where: str  # the zone or region
    name: str
    target_size: int = 0
    vms: dict[str, Vm] = field(default_factory=dict)

    @property
    def self_link(self) -> str:
        where = f"{BASE}/projects/{self.project}/{self.scope}/{self.where}"
        return f"{where}/instanceGroupManagers/{self.name}"

    def instance_zone(self) -> str:
        return self.where if self.scope == "zones" else f"{self.where}-b"

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
    ):
        scope, where = ("zones", zone) if zone else ("regions", region)
        assert where, "a zone or a region"
        self.group = Group(project, scope, where, group)
        self.spawn = spawn
        self.recreate = recreate
        self.requests: list[tuple[str, str]] = []  # (method, path?query)
        self.resizes: list[int] = []
        self.deleted: list[str] = []
        self.preempted: list[str] = []
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
            procs = [vm.proc for vm in self.group.vms.values() if vm.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    # -- what tests look at --------------------------------------------------------------

    def live(self) -> dict[str, subprocess.Popen[Any]]:
        """Instances whose process runs now: name -> process."""
        with self._lock:
            return {
                vm.name: vm.proc
                for vm in self.group.vms.values()
                if vm.proc is not None and vm.proc.poll() is None
            }

    def is_empty(self) -> bool:
        with self._lock:
            return self.group.target_size == 0 and not self.group.vms

    def resized_down(self) -> bool:
        """Whether any resize lowered the target size (CFlow must only delete by name)."""
        return any(b < a for a, b in itertools.pairwise([0, *self.resizes]))

    # -- the group's behaviour ----------------------------------------------------------

    def _reconcile_loop(self) -> None:
        while not self._stop.wait(0.05):
            self.reconcile()

    def reconcile(self) -> None:
        with self._lock:
            g = self.group
            for vm in list(g.vms.values()):
                exited = vm.proc is not None and vm.proc.poll() is not None
                if vm.deleting:
                    if vm.proc is None or exited:
                        del g.vms[vm.name]
                elif exited and self.recreate:  # preempted or crashed: a MIG recreates it
                    self.preempted.append(vm.name)
                    vm.action, vm.recreated = "RECREATING", vm.recreated + 1
                    vm.proc = self.spawn(vm.name)
                elif exited:
                    del g.vms[vm.name]
                elif vm.proc is None:
                    vm.proc = self.spawn(vm.name)
                else:
                    vm.action = "NONE"
            alive = [vm for vm in g.vms.values() if not vm.deleting]
            for _ in range(g.target_size - len(alive)):
                name = f"{g.name}-{secrets.token_hex(2)}"
                g.vms[name] = Vm(name, g.instance_zone())
            for vm in alive[g.target_size :]:  # a resize down: the MIG picks victims itself
                self._delete(vm)

    def _delete(self, vm: Vm) -> None:
        vm.deleting, vm.action = True, "DELETING"
        self.deleted.append(vm.name)
        if vm.proc is not None and vm.proc.poll() is None:
            vm.proc.send_signal(signal.SIGTERM)

    # -- the REST API ---------------------------------------------------------------------

    def _operation(self, kind: str, target: str) -> dict[str, Any]:
        g = self.group
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

    def _managed(self, vm: Vm) -> dict[str, Any]:
        alive = vm.proc is not None and vm.proc.poll() is None
        status = "STOPPING" if vm.deleting else ("RUNNING" if alive else "STAGING")
        return {
            "instance": self.group.instance_url(vm),
            "name": vm.name,
            "id": str(abs(hash(vm.name)) % 10**18),
            "instanceStatus": status,
            "currentAction": vm.action,
        }

    def handle(self, method: str, raw_path: str, body: dict[str, Any]) -> tuple[int, Any]:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, raw_path))
        with self._lock:
            g = self.group
            if m := _OPERATION_PATH.match(url.path):
                op = self._ops.get(m["name"])
                if op is None or (m["scope"], m["where"]) != (g.scope, g.where):
                    return _error(404, f"The resource operation '{m['name']}' was not found")
                return 200, op
            m = _GROUP_PATH.match(url.path)
            if m is None:
                return _error(404, f"no such endpoint {url.path}")
            if (m["project"], m["scope"], m["where"], m["group"]) != (
                g.project,
                g.scope,
                g.where,
                g.name,
            ):
                resource = f"projects/{m['project']}/{m['scope']}/{m['where']}"
                return _error(
                    404,
                    f"The resource '{resource}/instanceGroupManagers/{m['group']}' was not found",
                )
            verb = m["verb"]
            if method == "GET" and verb is None:
                return 200, {
                    "kind": "compute#instanceGroupManager",
                    "id": "4242",
                    "name": g.name,
                    "baseInstanceName": g.name,
                    "targetSize": g.target_size,
                    "selfLink": g.self_link,
                    "status": {"isStable": all(vm.action == "NONE" for vm in g.vms.values())},
                    ("zone" if g.scope == "zones" else "region"): (
                        f"{BASE}/projects/{g.project}/{g.scope}/{g.where}"
                    ),
                }
            if method == "POST" and verb == "resize":
                size = int(query["size"])
                self.resizes.append(size)
                g.target_size = size
                self.reconcile()
                return 200, self._operation("compute.instanceGroupManagers.resize", g.self_link)
            if method == "POST" and verb == "listManagedInstances":
                vms = sorted(g.vms.values(), key=lambda vm: vm.name)
                return 200, {"managedInstances": [self._managed(vm) for vm in vms]}
            if method == "POST" and verb == "deleteInstances":
                skip = bool(body.get("skipInstancesOnValidationError"))
                names = [u.rsplit("/", 1)[-1] for u in body.get("instances", [])]
                unknown = [n for n in names if n not in g.vms or g.vms[n].deleting]
                if unknown and not skip:
                    return _error(400, f"Instances {unknown} are not members of the group")
                for name in names:
                    if name not in unknown:
                        self._delete(g.vms[name])
                        g.target_size -= 1
                return 200, self._operation(
                    "compute.instanceGroupManagers.deleteInstances", g.self_link
                )
            return _error(400, f"unsupported {method} {verb}")

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

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _error(code: int, message: str) -> tuple[int, Any]:
    reason = {404: "notFound", 400: "invalid"}.get(code, "backendError")
    return code, {
        "error": {
            "code": code,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}],
        }
    }


def sleeper(name: str) -> subprocess.Popen[Any]:
    """A stand-in VM that only waits to be deleted."""
    return subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
