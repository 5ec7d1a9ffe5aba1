"""A shape's Compute Engine resources: the deployment's group and template read, a shape's
template and group made, listed and deleted, every call through Compute's retry policy (every
page of a listing too) and every operation waited on at the configured endpoint.

What the template and group of a shape hold, and why a shape has a group of its own, is said in
:mod:`runner.backends.gcp.shapes.groups`.
"""

from __future__ import annotations

import json
from typing import Any

from infra.contract import DEFAULT_ACTION_ON_FAILURE
from runner.backends.gcp.shapes.checks import rest_json
from runner.backends.gcp.shapes.model import ShapeError
from worker.clock import SYSTEM_CLOCK, Clock
from worker.defaults import COMPUTE_OPERATION_SECONDS as OPERATION_TIMEOUT


class ShapeResources:
    """The Compute calls on shaped templates and groups, in one zone or region.

    Args:
        project: the deployment's project.
        group: the deployment's group (its template is the base of every shape).
        zone: the group's zone (a zonal group), else None.
        region: the group's region.
    """

    def __init__(
        self,
        *,
        project: str,
        group: str,
        zone: str | None,
        region: str,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.project, self.group, self.zone, self.region = project, group, zone, region
        self.clock = clock
        from google.api_core import exceptions as gexc

        from runner.backends.gcp.compute import compute_v1  # only for cloud commands
        from runner.backends.gcp.fleet import compute_client_options
        from worker.backends.gcp import retry, retry_compute  # they load google.api_core
        from worker.backends.gcp.retry import COMPUTE
        from worker.backends.gcp.retry_compute import Retried

        self._retry: Any = retry
        self._operations: Any = retry_compute
        self._compute: Any = compute_v1
        self.gexc: Any = gexc
        # what a delete may end in besides "not found": an API error, a bad plain answer, or
        # an operation that outran its time
        self._failures = (
            gexc.GoogleAPICallError,
            retry.HttpAnswer,
            retry_compute.OperationStillRunning,
        )
        credentials, options = compute_client_options()
        kw: dict[str, Any] = {"credentials": credentials, "client_options": options}
        if zone:
            self._where: dict[str, str] = {"zone": zone}
            self._managers: Any = Retried(compute_v1.InstanceGroupManagersClient(**kw), COMPUTE)
            self._group_ops: Any = Retried(compute_v1.ZoneOperationsClient(**kw), COMPUTE)
        else:
            self._where = {"region": region}
            self._managers = Retried(compute_v1.RegionInstanceGroupManagersClient(**kw), COMPUTE)
            self._group_ops = Retried(compute_v1.RegionOperationsClient(**kw), COMPUTE)
        self._global_ops: Any = Retried(compute_v1.GlobalOperationsClient(**kw), COMPUTE)
        self._templates: Any = Retried(compute_v1.InstanceTemplatesClient(**kw), COMPUTE)
        self.images: Any = Retried(compute_v1.ImagesClient(**kw), COMPUTE)
        self._base: tuple[dict[str, Any], str, dict[str, Any]] | None = None

    @property
    def where(self) -> str:
        return f"zone {self.zone}" if self.zone else f"region {self.region}"

    def close(self) -> None:
        clients = (self._managers, self._templates, self.images, self._group_ops, self._global_ops)
        for client in clients:
            client.transport.close()

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
        self._base = rest_json(group), name, rest_json(template)
        return self._base

    def _request(self, group: str, **fields: Any) -> dict[str, Any]:
        return {"project": self.project, **self._where, "instance_group_manager": group, **fields}

    def ensure_template(self, name: str, base: str, props: dict[str, Any]) -> tuple[str, bool]:
        """Template ``name`` with ``props`` (copied from template ``base``): its URL, and
        whether it was made now (False: it existed, made by an earlier run of the shape)."""
        try:
            found = self._templates.get(
                request={"project": self.project, "instance_template": name}
            )
            return str(found.self_link), False
        except self.gexc.NotFound:
            pass
        body = {
            "name": name,
            "description": f"CFlow worker, a run's shape (from {base})",
            "properties": props,
        }
        resource = self._compute.InstanceTemplate.from_json(
            json.dumps(body), ignore_unknown_fields=True
        )
        request = {"project": self.project, "instance_template_resource": resource}
        try:
            self._mutate(f"insert instance template {name}", self._templates, request)
        except self.gexc.Conflict:  # another runner made it first: the same content by its name
            pass
        except (self.gexc.BadRequest, self._retry.HttpAnswer) as exc:
            raise ShapeError(
                f"Compute Engine refused the template for this shape: {exc.message}"
            ) from None
        found = self._templates.get(request={"project": self.project, "instance_template": name})
        return str(found.self_link), True

    def ensure_group(
        self, name: str, base: dict[str, Any], template_url: str, digest: str, zones: list[str]
    ) -> bool:
        """Group ``name`` of ``template_url``, like the deployment's group ``base`` but empty
        and spread over ``zones`` (a regional group); whether it was made now."""
        try:
            self._managers.get(request=self._request(name))
            return False
        except self.gexc.NotFound:
            pass
        body: dict[str, Any] = {
            "name": name,
            "baseInstanceName": f"{base.get('baseInstanceName') or self.group}-{digest}",
            "instanceTemplate": template_url,
            "targetSize": 0,  # the runner grows it, as it does the deployment's group
            "updatePolicy": base.get("updatePolicy") or {"type": "OPPORTUNISTIC"},
            "instanceLifecyclePolicy": {
                **base.get("instanceLifecyclePolicy", {}),
                "defaultActionOnFailure": DEFAULT_ACTION_ON_FAILURE,
            },
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
            self._mutate(f"insert instance group {name}", self._managers, request)
        except self.gexc.Conflict:
            return False
        except (self.gexc.BadRequest, self._retry.HttpAnswer) as exc:
            raise ShapeError(
                f"Compute Engine refused the group for this shape: {exc.message}"
            ) from None
        return True

    def list_groups(self) -> list[Any]:
        """Every instance group in the deployment's zone or region."""
        try:
            return list(self._managers.list(request={"project": self.project, **self._where}))
        except self.gexc.GoogleAPICallError as exc:
            raise ShapeError(
                f"could not list the instance groups in {self.where}: {exc.message}"
            ) from None

    def group_instances(self, name: str) -> list[Any]:
        """The instances group ``name`` has (creating, running or being deleted)."""
        return list(self._managers.list_managed_instances(request=self._request(name)))

    def delete_group(self, name: str, *, timeout: float = OPERATION_TIMEOUT) -> None:
        """Delete group ``name`` (gone already is fine), then its template of the same name."""
        what = f"delete instance group {name}"
        try:
            self._mutate(what, self._managers, self._request(name), "delete", timeout)
        except self.gexc.NotFound:
            pass
        except self._failures as exc:
            raise ShapeError(f"could not {what}: {_said(exc)}") from None
        request = {"project": self.project, "instance_template": name}
        try:
            self._mutate(f"delete instance template {name}", self._templates, request, "delete")
        except self.gexc.NotFound:
            pass
        except self._failures as exc:
            raise ShapeError(f"could not delete instance template {name}: {_said(exc)}") from None

    def _mutate(
        self,
        what: str,
        client: Any,
        request: dict[str, Any],
        verb: str = "insert",
        timeout: float = OPERATION_TIMEOUT,
    ) -> None:
        """``client``'s ``verb`` on ``request``, waited for at the configured endpoint (not
        the library's ``.result()``, which polls compute.googleapis.com) through Compute's
        retry policy (:func:`worker.backends.gcp.retry_compute.run_operation`)."""

        def wait(operation: Any) -> Any:
            ops, where = self._global_ops, {}
            if operation.zone:
                ops, where = self._group_ops, {"zone": operation.zone.rsplit("/", 1)[-1]}
            elif operation.region:
                ops, where = self._group_ops, {"region": operation.region.rsplit("/", 1)[-1]}
            return ops.wait(request={"project": self.project, **where, "operation": operation.name})

        self._operations.run_operation(
            lambda: getattr(client, f"{verb}_unary")(request=request),
            wait,
            what=what,
            clock=self.clock,
            timeout=timeout,
        )


def _said(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)
