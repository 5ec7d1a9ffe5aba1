"""The fake Compute API's instance group endpoints (tests/gcp/fake_compute.py), as the API
answers them.

``instanceGroupManagers`` (zonal) and ``regionInstanceGroupManagers``: ``get``, ``list``,
``insert``, ``delete``, ``resize``, ``listManagedInstances`` (paged), ``deleteInstances`` and
``abandonInstances``; ``regions.get`` and ``projects.get`` (quotas); the operations they return
(done at once). Refused as documented: more than 1,000 instances in one ``deleteInstances`` /
``abandonInstances`` (400), a ``resize`` past a zonal group's 1,000 VMs or a regional one's 2,000
(400), at most 500 instances a page, a group name that is not RFC 1035 or already taken, a
template that does not exist, a ``distributionPolicy`` zone outside the group's region, malformed
or foreign instance URLs, and verbs in ``denied`` (403).
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from tests.gcp.fake_templates import NAME
from tests.gcp.fake_vms import Group, Vm, VmReconciler, region_zones
from tests.gcp.fault_compute import BASE, api_error, instance_url_refusal

DELETE_LIMIT = 1000  # instances per deleteInstances / abandonInstances request
PAGE_LIMIT = 500  # listManagedInstances maxResults: default and most


def region_quotas() -> dict[str, tuple[float, float]]:
    """``regions.get`` quotas by default: metric -> (limit, usage)."""
    return {
        "CPUS": (24.0, 0.0),
        "PREEMPTIBLE_CPUS": (0.0, 0.0),
        "DISKS_TOTAL_GB": (4096.0, 0.0),
        "SSD_TOTAL_GB": (500.0, 0.0),
        "IN_USE_ADDRESSES": (8.0, 0.0),
        # Machine series with a CPU quota of their own (n1 and e2 count against CPUS).
        **{f"{s}_CPUS": (24.0, 0.0) for s in ("N2", "N2D", "C2", "C2D", "C3", "A2", "G2")},
    }


class GroupApi(VmReconciler):
    """The group, region, project and zonal/regional operation endpoints of the fake."""

    denied: frozenset[str]
    resizes: list[int]
    abandoned: list[Vm]
    deleted_groups: list[str]
    project_quotas: dict[str, tuple[float, float]]
    now: Callable[[], datetime]
    _ops: dict[str, dict[str, Any]]
    _ids: itertools.count[int]

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
        status = "TERMINATED" if vm.terminated and not vm.deleting else status
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

    def _group_call(
        self, g: Group, method: str, verb: str | None, query: dict[str, str], body: dict[str, Any]
    ) -> tuple[int, Any]:
        if verb in self.denied:
            return api_error(
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
                return api_error(
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
                return api_error(
                    400,
                    f"Invalid value for field 'resource.instances': {len(urls)} instances. "
                    f"At most {DELETE_LIMIT} instances can be specified in one request.",
                )
            if refused := instance_url_refusal(g.project, g.scope, g.where, urls):
                return refused  # even with skipInstancesOnValidationError
            skip = bool(body.get("skipInstancesOnValidationError"))
            names = [u.rsplit("/", 1)[-1] for u in urls]
            unknown = [n for n in names if n not in g.vms or g.vms[n].deleting]
            if unknown and not skip:
                return api_error(400, f"Instances {unknown} are not members of the group")
            for name in names:
                if name not in unknown:
                    if verb == "deleteInstances":
                        self._delete(g.vms[name])
                    else:
                        self.abandoned.append(g.vms.pop(name))
                    g.target_size -= 1
            return 200, self._operation(f"compute.instanceGroupManagers.{verb}", g.self_link, g)
        return api_error(400, f"unsupported {method} {verb}")

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
            "instanceLifecyclePolicy": {"defaultActionOnFailure": self.default_action_on_failure},
            scope_key: f"{BASE}/projects/{g.project}/{g.scope}/{g.where}",
        }

    def _list_groups(self, scope: str, where: str) -> dict[str, Any]:
        items = [
            self._describe(g)
            for g in sorted(self.groups.values(), key=lambda g: g.name)
            if (g.scope, g.where) == (scope, where)
        ]
        return {"kind": "compute#instanceGroupManagerList", "items": items}

    def _insert_group(self, scope: str, where: str, body: dict[str, Any]) -> tuple[int, Any]:
        name = str(body.get("name", ""))
        project = self.group.project
        resource = f"projects/{project}/{scope}/{where}/instanceGroupManagers/{name}"
        if not NAME.fullmatch(name):
            return api_error(400, f"Invalid value for field 'resource.name': '{name}'.")
        if name in self.groups:
            return api_error(
                409, f"The resource '{resource}' already exists", reason="alreadyExists"
            )
        template = str(body.get("instanceTemplate", "")).rsplit("/", 1)[-1]
        if template not in self.templates:
            missing = f"projects/{project}/global/instanceTemplates/{template}"
            return api_error(404, f"The resource '{missing}' was not found")
        zones: list[str] = []
        if scope == "regions":
            wanted = body.get("distributionPolicy", {}).get("zones") or []
            zones = [str(z.get("zone", "")).rsplit("/", 1)[-1] for z in wanted]
            stray = [z for z in zones if z not in region_zones(where)]
            if stray:
                return api_error(
                    400,
                    f"Invalid value for field 'resource.distributionPolicy.zones': "
                    f"zone '{stray[0]}' is not in region '{where}'.",
                )
        elif "distributionPolicy" in body:
            return api_error(400, "A zonal instance group manager has no distributionPolicy.")
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
            zones=zones or (region_zones(where) if scope == "regions" else []),
            record=record,
        )
        self.groups[name] = group
        return 200, self._operation("compute.instanceGroupManagers.insert", link, group)

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
            "zones": [
                f"{BASE}/projects/{self.group.project}/zones/{z}" for z in region_zones(region)
            ],
            "quotas": [
                {"metric": metric, "limit": limit, "usage": usage}
                for metric, (limit, usage) in quotas.items()
            ],
        }
