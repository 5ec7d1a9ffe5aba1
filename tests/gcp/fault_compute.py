"""How the fake Compute API fails: rate quotas, random faults, creation errors, URL checks.

``FakeCompute`` (tests/gcp/fake_compute.py) holds one :class:`ComputeFaults` as ``fake.faults``
and asks it at a few points; with a ``FaultPlan`` of rate 0 (the default) nothing here changes an
answer. What it does, each as Compute Engine documents it:

- Rate quotas (https://cloud.google.com/compute/api-quota): each project has per-minute quotas
  per group of methods (reads, lists, operation reads, writes), globally and per region, each
  counted separately; past one the answer is 403 ``rateLimitExceeded``, and the quota "refills at
  the start of the next synchronized interval" (10:00:15 -> 10:01:00), not a sliding window.
- Random faults of any call (``FaultPlan`` kinds ``5xx``, ``rate_limit``, ``timeout``,
  ``reset``): a 500, 502 or 503 in the API's JSON error shape; a rate limit that exhausts the
  call's quota group until the next synchronized window; an answer held past the client's
  deadline and then dropped (a mutation is applied first: the caller cannot tell whether it
  was); a connection reset.
- Operations (``slow_operation``, ``operation_error``) that stay PENDING, then RUNNING, for up to
  ``plan.delay`` seconds, and end DONE, or DONE with an ``error`` (and then the mutation never
  happened). ``operations.wait`` returns when the operation is done or after a while, and may
  return one that is not: "Be prepared to retry if the operation is not DONE"
  (https://cloud.google.com/compute/docs/reference/rest/v1/zoneOperations/wait).
- VM creation: new VMs may take up to ``plan.delay`` seconds to appear (``slow_create``); a Spot
  VM may hit a stockout (``stockout``, or a zone in ``stockouts``): ``lastAttempt.errors`` has
  ``ZONE_RESOURCE_POOL_EXHAUSTED`` and the group retries; a machine series with a CPU quota of
  its own (``N2_CPUS``, ``C2_CPUS``, ... the ``regions.get`` metric names) refuses a VM past it
  with ``QUOTA_EXCEEDED``.
- ``deleteInstances`` / ``abandonInstances``: "The operation always fails if the request contains
  a malformed instance URL or a reference to an instance that exists in a zone or region other
  than the group's zone or region", even with ``skipInstancesOnValidationError``
  (https://cloud.google.com/compute/docs/reference/rest/v1/instanceGroupManagers/deleteInstances).
- A VM that powers itself off (its worker's exit status 75, on which the unit powers the VM off)
  is a failed VM: the group's ``instanceLifecyclePolicy.defaultActionOnFailure`` REPAIR (the
  default) recreates it, DO_NOTHING leaves it TERMINATED in the group
  (https://cloud.google.com/compute/docs/instance-groups/about-repair).
"""

from __future__ import annotations

import itertools
import re
import secrets
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.gcp.faults import COMPUTE_CREATE_KINDS, COMPUTE_KINDS, SLOW_CREATE, FaultPlan

BASE = "https://www.googleapis.com/compute/v1"
POWERED_OFF = 75  # the worker's exit status on which its unit powers the VM off
CREATE_RETRY = 1.0  # seconds between a group's attempts to create a VM that failed
WAIT_MOST = 2.0  # seconds operations.wait holds before answering with an operation not done
# Machine series whose CPUs count against the region's CPUS quota; the others have <SERIES>_CPUS.
SHARED_CPU_SERIES = frozenset({"n1", "e2", "f1", "g1"})
_SCOPED = re.compile(
    r"^/compute/v1/projects/(?P<project>[^/]+)/(?:(?P<scope>zones|regions)/(?P<where>[^/]+)"
    r"|global)(?:/|$)"
)
_PROJECT = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)")
_INSTANCE_URL = re.compile(
    r"^(?:https://(?:www|compute)\.googleapis\.com/compute/v1/)?"
    r"(?:projects/(?P<project>[^/]+)/)?zones/(?P<zone>[^/]+)/instances/"
    r"(?P<name>[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)$"
)
# Operation errors a mutation may end with: (code, HTTP status, its message).
_OPERATION_ERRORS = (
    ("RESOURCE_NOT_READY", 400, "BAD REQUEST", "The resource '{target}' is not ready"),
    ("INTERNAL_ERROR", 500, "INTERNAL SERVER ERROR", "Internal error. Please try again."),
)
SeriesQuota = Callable[[str], tuple[float, float] | None]
_STATUS_TEXT = {500: "Internal Error", 502: "Bad Gateway", 503: "Service Unavailable"}


def _region(zone_or_region: str) -> str:
    """The region of a zone (``us-central1-a`` -> ``us-central1``), or a region itself."""
    head, _, tail = zone_or_region.rpartition("-")
    return head if len(tail) == 1 else zone_or_region


def quota_bucket(method: str, path: str) -> tuple[str, str, str]:
    """``(project, scope, group)``: the rate quota a call counts against (scope ``global`` or
    ``region/R``; group ``read``, ``list``, ``operation_read`` or ``write``)."""
    project = m["project"] if (m := _PROJECT.match(path)) else ""
    scoped = _SCOPED.match(path)
    scope = "global"
    if scoped and scoped["scope"]:
        scope = f"region/{_region(scoped['where'])}"
    tokens = [t for t in path.split("/")[5:] if t not in ("", "global")]
    if "operations" in tokens:
        return project, scope, "operation_read"
    if tokens and tokens[-1] == "listManagedInstances":
        return project, scope, "list"
    if method != "GET":
        return project, scope, "write"
    if "family" in tokens or len(tokens) % 2 == 0:
        return project, scope, "read"
    return project, scope, "list"


class RateQuota:
    """Per-minute quota buckets that refill at the next synchronized window (``clock`` time
    divided into ``window``-second intervals, as wall-clock minutes are)."""

    def __init__(self) -> None:
        self._used: dict[tuple[str, str, str], tuple[int, float]] = {}

    def admit(self, key: tuple[str, str, str], limit: float, window: float, now: float) -> bool:
        index = int(now // window)
        at, used = self._used.get(key, (index, 0.0))
        used = used if at == index else 0.0
        if used >= limit:
            self._used[key] = (index, used)
            return False
        self._used[key] = (index, used + 1)
        return True

    def exhaust(self, key: tuple[str, str, str], window: float, now: float) -> None:
        """Use up the bucket until its next window."""
        self._used[key] = (int(now // window), float("inf"))


@dataclass
class _Pending:
    started: float
    done_at: float
    error: tuple[str, int, str, str] | None  # code, HTTP status, status text, message


def site(method: str, path: str) -> str:
    """The plan's site of a call: the method and the path's collection names and verb."""
    tokens = path.split("?", 1)[0].split("/")[5:]
    return f"compute:{method} " + "/".join(t for i, t in enumerate(tokens) if i % 2 == 0)


def _mutation(method: str, path: str) -> bool:
    if method == "GET" or "/operations/" in path:
        return False
    return not path.split("?", 1)[0].endswith("/listManagedInstances")


def error(code: int, message: str, reason: str) -> tuple[int, Any]:
    """An answer in the API's JSON error shape."""
    return api_error(code, message, reason=reason)


def api_error(code: int, message: str, *, reason: str | None = None) -> tuple[int, Any]:
    """An answer in the API's JSON error shape (the reason follows the code when not given)."""
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


class ComputeFaults:
    """The fault side of one fake Compute API (``fake.faults``)."""

    def __init__(self, plan: FaultPlan | None = None, clock: Callable[[], float] = time.time):
        self.plan = plan or FaultPlan()
        self.clock = clock
        self.stockouts: set[str] = set()  # zones out of Spot capacity, until removed
        self.quota = RateQuota()
        self._pending: dict[str, _Pending] = {}  # operation name -> when it ends, and how
        self._ready_at: dict[str, float] = {}  # VM name -> when its creation may start
        self._retry_at: dict[str, tuple[float, dict[str, str]]] = {}  # VM -> next try, error
        self._current = threading.local()  # the fault drawn for the call a thread serves
        self._ids = itertools.count(7_000_000)
        self._lock = threading.Lock()

    # -- a call ---------------------------------------------------------------------------

    def begin(self, method: str, path: str) -> str | None:
        """Draw the fault of the call this thread serves now (None: none)."""
        path = path.split("?", 1)[0]
        kinds = COMPUTE_KINDS if _mutation(method, path) else COMPUTE_KINDS[:4]
        self._current.fault = fault = self.plan.draw(site(method, path), kinds)
        return fault

    def current(self) -> str | None:
        """The fault drawn for the call this thread serves."""
        return getattr(self._current, "fault", None)

    def before(
        self,
        method: str,
        path: str,
        fault: str | None,
        window: float,
        ops: dict[str, dict[str, Any]],
    ) -> tuple[int, Any] | None:
        """An answer that replaces the call's own (None: serve it)."""
        if fault == "5xx":
            code = (500, 502, 503)[int(self.plan.uniform(site(method, path)) * 3)]
            reason = "backendError" if code != 503 else "serviceUnavailable"
            return error(code, _STATUS_TEXT[code], reason)
        if fault == "rate_limit":
            self.quota.exhaust(quota_bucket(method, path), window, self.clock())
            return error(403, "Rate Limit Exceeded", "rateLimitExceeded")
        if fault == "operation_error":
            op = self._failing_operation(method, path)
            ops[op["name"]] = op
            return 200, self.refresh(op)
        return None

    def after(self, method: str, path: str, fault: str | None, answer: Any) -> Any:
        """The call's answer, with a slow operation left pending, a pending one brought up to
        now."""
        if not (isinstance(answer, dict) and answer.get("kind") == "compute#operation"):
            return answer
        if fault == "slow_operation" and answer.get("status") == "DONE":
            now = self.clock()
            delay = self.plan.uniform(site(method, path)) * self.plan.delay
            with self._lock:
                self._pending[answer["name"]] = _Pending(now, now + delay, None)
        return self.refresh(answer)

    def refresh(self, op: dict[str, Any]) -> dict[str, Any]:
        """Bring a pending operation up to now: PENDING, RUNNING, then DONE (maybe failed)."""
        with self._lock:
            pending = self._pending.get(str(op.get("name")))
            if pending is None:
                return op
            now = self.clock()
            if now < pending.done_at:
                halfway = now >= (pending.started + pending.done_at) / 2
                op.update(status="RUNNING" if halfway else "PENDING", progress=50 if halfway else 0)
                return op
            del self._pending[str(op["name"])]
        op.update(status="DONE", progress=100)
        if pending.error is not None:
            code, status, text, message = pending.error
            op["error"] = {"errors": [{"code": code, "message": message}]}
            op.update(httpErrorStatusCode=status, httpErrorMessage=text)
        return op

    def hold(self, path: str, stop: threading.Event) -> None:
        """``operations.wait`` on a pending operation: wait (not under the fake's lock) until
        it is due, at most :data:`WAIT_MOST` seconds."""
        path = path.split("?", 1)[0]
        if not path.endswith("/wait"):
            return
        with self._lock:
            pending = self._pending.get(path.rsplit("/", 2)[-2])
        if pending is not None:
            stop.wait(max(0.0, min(pending.done_at - self.clock(), WAIT_MOST)))

    def _failing_operation(self, method: str, path: str) -> dict[str, Any]:
        m = _SCOPED.match(path)
        project = m["project"] if m else ""
        where = f"{m['scope']}/{m['where']}" if m and m["scope"] else "global"
        op_id = next(self._ids)
        name = f"operation-{op_id}-{secrets.token_hex(4)}"
        target = f"{BASE}{path.removeprefix('/compute/v1').split('?', 1)[0]}"
        target = re.sub(r"/(resize|deleteInstances|abandonInstances|[a-z][A-Za-z]+)$", "", target)
        op: dict[str, Any] = {
            "kind": "compute#operation",
            "id": str(op_id),
            "name": name,
            "operationType": path.rsplit("/", 1)[-1] if method == "POST" else method.lower(),
            "targetLink": target,
            "status": "PENDING",
            "progress": 0,
            "insertTime": time.strftime("%Y-%m-%dT%H:%M:%S.000-00:00", time.gmtime()),
            "selfLink": f"{BASE}/projects/{project}/{where}/operations/{name}",
        }
        if m and m["scope"]:
            op["zone" if m["scope"] == "zones" else "region"] = (
                f"{BASE}/projects/{project}/{m['scope']}/{m['where']}"
            )
        now = self.clock()
        code, status, text, message = _OPERATION_ERRORS[
            int(self.plan.uniform(site(method, path)) * len(_OPERATION_ERRORS))
        ]
        failure = (code, status, text, message.format(target=target.removeprefix(BASE + "/")))
        delay = self.plan.uniform(site(method, path)) * self.plan.delay
        with self._lock:
            self._pending[name] = _Pending(now, now + delay, failure)
        return op

    # -- VMs ------------------------------------------------------------------------------

    def creating(self, name: str) -> bool:
        """Whether a new VM is still on its way (not yet created, no error either)."""
        with self._lock:
            ready_at = self._ready_at.get(name)
            if ready_at is None:
                slow = self.plan.draw("compute:create", (SLOW_CREATE,)) is not None
                delay = self.plan.uniform("compute:create") * self.plan.delay if slow else 0.0
                ready_at = self._ready_at[name] = self.clock() + delay
        return self.clock() < ready_at

    def creation_error(
        self, name: str, project: str, zone: str, props: dict[str, Any], series: SeriesQuota
    ) -> dict[str, str] | None:
        """Why this attempt to create VM ``name`` fails (a ``lastAttempt.errors`` entry), or
        None; ``series(metric)`` is a CPU quota's ``(limit, free)``, None where it has none."""
        now = self.clock()
        with self._lock:
            retry = self._retry_at.get(name)
        if retry is not None and now < retry[0]:
            return retry[1]  # the group tries again a little later
        refused = self._stockout(project, zone, props) or _series_quota(props, zone, series)
        with self._lock:
            if refused is None:
                self._retry_at.pop(name, None)
            else:
                self._retry_at[name] = (now + CREATE_RETRY, refused)
        return refused

    def _stockout(self, project: str, zone: str, props: dict[str, Any]) -> dict[str, str] | None:
        spot = props.get("scheduling", {}).get("provisioningModel") == "SPOT"
        drawn = spot and self.plan.draw(f"compute:create {zone}", COMPUTE_CREATE_KINDS)
        if zone not in self.stockouts and not drawn:
            return None
        return {
            "code": "ZONE_RESOURCE_POOL_EXHAUSTED",
            "message": f"The zone 'projects/{project}/zones/{zone}' does not have enough "
            "resources available to fulfill the request.  Try a different zone, or try again "
            "later.",
        }


def cpu_metric(machine_type: str) -> tuple[str, int]:
    """The ``regions.get`` quota metric a machine type's CPUs count against, and how many."""
    name = machine_type.rsplit("/", 1)[-1]
    series = name.split("-", 1)[0]
    cpus = int(m[1]) if (m := re.search(r"-(\d+)$", name)) else 1
    return ("CPUS" if series in SHARED_CPU_SERIES else f"{series.upper()}_CPUS"), cpus


def _series_quota(props: dict[str, Any], zone: str, series: SeriesQuota) -> dict[str, str] | None:
    metric, cpus = cpu_metric(str(props.get("machineType", "")))
    quota = None if metric == "CPUS" else series(metric)
    if quota is None or quota[1] >= cpus:
        return None
    limit = quota[0]
    return {
        "code": "QUOTA_EXCEEDED",
        "message": f"Quota '{metric}' exceeded.  Limit: {limit} in region {_region(zone)}.",
    }


def instance_url_refusal(
    project: str, scope: str, where: str, urls: list[str]
) -> tuple[int, Any] | None:
    """The 400 for a malformed instance URL, or one of another project, zone or region."""
    for index, url in enumerate(urls):
        field = f"resource.instances[{index}]"
        m = _INSTANCE_URL.match(str(url))
        if m is None:
            return error(
                400,
                f"Invalid value for field '{field}': '{url}'. The URL is malformed.",
                "invalid",
            )
        elsewhere = m["project"] not in (None, project) or (
            m["zone"] != where if scope == "zones" else _region(m["zone"]) != where
        )
        if elsewhere:
            return error(
                400,
                f"Invalid value for field '{field}': '{url}'. Instance is not in the "
                f"{'zone' if scope == 'zones' else 'region'} '{where}' of the instance group.",
                "invalid",
            )
    return None


def failure_action(record: dict[str, Any], default: str) -> str:
    """A group's ``instanceLifecyclePolicy.defaultActionOnFailure`` (REPAIR when unset)."""
    policy = record.get("instanceLifecyclePolicy") or {}
    return str(policy.get("defaultActionOnFailure") or default or "REPAIR")


class FakeServer(ThreadingHTTPServer):
    """The HTTP server of a fake or a proxy: a thread per connection, none kept at exit, and a
    connection the client reset (a VM or a runner killed mid-call, as the soaks do) ended
    quietly rather than with a traceback on stderr."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def break_connection(
    handler: BaseHTTPRequestHandler, fault: str, plan: FaultPlan, stop: threading.Event
) -> None:
    """End a call without an answer: a reset now, or a timeout (held ``plan.hang`` seconds,
    then dropped)."""
    handler.close_connection = True
    if fault == "timeout":
        stop.wait(plan.hang)
    # Linger 0: closing sends a TCP reset rather than an orderly end.
    handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
