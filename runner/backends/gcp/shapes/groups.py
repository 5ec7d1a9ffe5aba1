"""Machine shape per run: a group and an instance template of its own, reused by content.

A run that asks for a shape gets a managed instance group of its own, ``<group>-<hash>``, made
from an instance template derived from the deployment's (``instanceTemplates.get``, then an
``insert`` of a copy with the shape). Both are named by a content hash of the deployment's
template and the shape, so a second run with the same shape reuses them, and a redeploy (a new
worker, a new image) gives new ones.

Why a group per shape and not the deployment's group pointed at a new template: a group has one
template for the VMs it creates, so re-pointing it while another run's VMs work would give that
run's recreated (preempted) VMs the wrong machine, and an update policy could even replace its
busy VMs. A group per shape never touches another run's VMs. Its instances are named
``<base instance name>-<hash>-xxxx``, so the worker's conditioned right to delete its own VM
(names starting ``<prefix>-worker-``) still holds, and no new right is needed.

Each shape also has a work topic and subscription of its own
(:mod:`runner.backends.gcp.shapes.queues`, named by the same hash), which the shaped template's
metadata names: a shape's VMs pull only its runs' shards, so concurrent runs of different shapes
never run each other's shards.

A regional deployment (a regional group, with the stack's global instance template) gets
regional shaped groups (``regionInstanceGroupManagers``), spread over the zones of the
deployment group's ``distributionPolicy`` (or the region's zones) that offer the machine type
and the GPU; a shape no zone there offers is refused. The templates stay global, as the
deployment's is.

A shape with GPUs boots a GPU-ready image: a Deep Learning VM image (``DEFAULT_GPU_IMAGE``, with
the ``install-nvidia-driver`` metadata Google documents for those images, which installs the
NVIDIA driver at first boot), or the deployment's ``gpu_image`` setting (``CFLOW_GPU_IMAGE``).
Such an image (and an ``--image`` run's ``container_image``) is read first
(:mod:`runner.backends.gcp.shapes.images`): one that does not exist is refused in one line, and
the boot disk is made at least as large as the image.

Every shaped group has the deployment group's failure policy
(``instanceLifecyclePolicy.defaultActionOnFailure = DO_NOTHING``): a VM that powered itself off
(its worker could not leave the group) stays off instead of being recreated to boot again.

Everything is checked before anything is made or published, each refusal one line
(:class:`~runner.backends.gcp.shapes.model.ShapeError`): the zones offer the machine type and
the GPU, and the quotas hold a VM of the shape, with its disk
(:mod:`runner.backends.gcp.shapes.checks`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from infra.contract import DEFAULT_ACTION_ON_FAILURE
from runner.backends.gcp.shapes.checks import ShapeChecks, rest_json
from runner.backends.gcp.shapes.images import BootImages
from runner.backends.gcp.shapes.model import Shape, ShapedGroup, ShapeError, is_spot
from runner.backends.gcp.shapes.template import (
    DEFAULT_GPU_IMAGE,
    boot_image,
    derive_properties,
    set_metadata,
)
from runner.backends.gcp.wheels import keep_worker_package
from worker.clock import SYSTEM_CLOCK, Clock
from worker.defaults import COMPUTE_OPERATION_SECONDS as OPERATION_TIMEOUT

if TYPE_CHECKING:
    from runner.backends.gcp.shapes.queues import ShapeQueues


class Shapes:
    """Check shapes against a zone (or region) and make (or reuse) their template and group.

    Args:
        project: the deployment's project.
        group: the deployment's group (its template is the base of every shape).
        zone: the group's zone (a zonal group).
        region: the group's region (a regional group; used when ``zone`` is empty).
        queues: makes each shape's work topic and subscription (None: the shaped VMs pull the
            deployment's work subscription, as the base template says).
        gpu_image: the boot image of shapes with GPUs.
        container_image: the boot image of runs with ``--image`` (podman or docker, Python
            3.11); None: such runs are refused, as the deployment's Debian has no engine.
    """

    def __init__(
        self,
        *,
        project: str,
        group: str,
        zone: str | None = None,
        region: str | None = None,
        queues: ShapeQueues | None = None,
        gpu_image: str | None = None,
        container_image: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not zone and not region:
            raise ShapeError(f"instance group {group} needs a zone or a region")
        self.project, self.group, self.zone = project, group, zone
        self.region = zone.rsplit("-", 1)[0] if zone else str(region)
        self.queues = queues
        self.gpu_image = gpu_image or DEFAULT_GPU_IMAGE
        self.container_image = container_image or None
        self.clock = clock
        from google.api_core import exceptions as gexc
        from google.cloud import compute_v1  # loads in a second: only for cloud commands

        from runner.backends.gcp.fleet import compute_client_options
        from worker.backends.gcp import retry  # with the clients: it loads google.api_core
        from worker.backends.gcp.retry import COMPUTE, Retried

        self._retry: Any = retry

        self._compute: Any = compute_v1
        self._gexc: Any = gexc
        # what a delete may end in besides "not found": an API error, a bad plain answer, or
        # an operation that outran its time
        self._failures = (gexc.GoogleAPICallError, retry.HttpAnswer, retry.OperationStillRunning)
        credentials, options = compute_client_options()
        kw: dict[str, Any] = {"credentials": credentials, "client_options": options}
        if zone:
            self._where: dict[str, str] = {"zone": zone}
            self._managers: Any = Retried(compute_v1.InstanceGroupManagersClient(**kw), COMPUTE)
            self._group_ops: Any = Retried(compute_v1.ZoneOperationsClient(**kw), COMPUTE)
        else:
            self._where = {"region": self.region}
            self._managers = Retried(compute_v1.RegionInstanceGroupManagersClient(**kw), COMPUTE)
            self._group_ops = Retried(compute_v1.RegionOperationsClient(**kw), COMPUTE)
        self._global_ops: Any = Retried(compute_v1.GlobalOperationsClient(**kw), COMPUTE)
        self._templates: Any = Retried(compute_v1.InstanceTemplatesClient(**kw), COMPUTE)
        self._images: Any = Retried(compute_v1.ImagesClient(**kw), COMPUTE)
        self.images = BootImages(project=project, client=self._images, gexc=gexc)
        self.checks = ShapeChecks(project=project, region=self.region)
        self._base: tuple[dict[str, Any], str, dict[str, Any]] | None = None

    @property
    def where(self) -> str:
        return f"zone {self.zone}" if self.zone else f"region {self.region}"

    def close(self) -> None:
        clients = (self._managers, self._templates, self._images, self._group_ops, self._global_ops)
        for client in clients:
            client.transport.close()
        self.checks.close()

    # -- reading ---------------------------------------------------------------------------

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

    def normalize(self, shape: Shape) -> tuple[Shape, str]:
        """The shape with its provisioning said, and its hash (its group is ``<group>-<hash>``).

        The same VMs whether "spot" was said or came from the deployment: one hash for both.
        """
        _, base_name, base_template = self.base()
        props = base_template.get("properties", {})
        spot = is_spot(shape, props)
        shape = dataclasses.replace(shape, provisioning="spot" if spot else "standard")
        link = str(base_template.get("selfLink") or base_name)
        boot = self._boot_image(shape, props)
        return shape, shape.digest(link, image=boot[0] if boot else None)

    def _boot_image(self, shape: Shape, props: dict[str, Any]) -> tuple[str, str] | None:
        return boot_image(shape, props, gpu_image=self.gpu_image, engine_image=self.container_image)

    def _disk_gb(self, shape: Shape, props: dict[str, Any]) -> int | None:
        """The boot disk (GB) VMs of ``shape`` get (:meth:`BootImages.disk_for`)."""
        return self.images.disk_for(shape, props, self._boot_image(shape, props))

    # -- making ----------------------------------------------------------------------------

    def check(self, shape: Shape) -> tuple[Shape, str, list[str]]:
        """Refuse (one line) a shape that cannot run here: its boot image, its disk, the zones
        and the quotas. The shape as its VMs get it (provisioning said, disk sized), its hash,
        and the zones that offer it."""
        base_group, _, base_template = self.base()
        props = base_template.get("properties", {})
        shape, digest = self.normalize(shape)
        disk_gb = self._disk_gb(shape, props)
        sized = shape if disk_gb is None else dataclasses.replace(shape, disk_gb=disk_gb)
        candidates = [self.zone] if self.zone else self.checks.region_zones(base_group)
        return sized, digest, self.checks.check(sized, props, candidates)

    def ensure(self, shape: Shape) -> ShapedGroup:
        """Check ``shape``, then the template and group for it, made unless they exist."""
        base_group, base_name, base_template = self.base()
        props = base_template.get("properties", {})
        sized, digest, zones = self.check(shape)
        shape = dataclasses.replace(sized, disk_gb=shape.disk_gb)  # as asked, for its summary
        name = f"{self.group}-{digest}"
        spot = shape.provisioning == "spot"
        derived = derive_properties(
            props,
            sized,
            spot=spot,
            gpu_image=self.gpu_image,
            container_image=self.container_image,
        )
        set_metadata(derived, "cflow-group", name)  # a worker removes itself from its own group
        queue = self.queues.ensure(digest) if self.queues is not None else None
        if queue is not None:  # its workers pull (and re-queue on) the shape's own queue
            set_metadata(derived, "cflow-work-topic", queue.topic)
            set_metadata(derived, "cflow-subscription", queue.subscription)
        keep_worker_package(derived, self.project)  # a later deploy must not delete its wheels
        template_url, made_template = self._ensure_template(name, base_name, derived)
        made_group = self._ensure_group(name, base_group, template_url, digest, zones)
        machine_type = str(derived.get("machineType", ""))
        made = made_template or made_group
        return ShapedGroup(name, name, shape, made, machine_type, digest, queue)

    def _ensure_template(self, name: str, base: str, props: dict[str, Any]) -> tuple[str, bool]:
        try:
            found = self._templates.get(
                request={"project": self.project, "instance_template": name}
            )
            return str(found.self_link), False
        except self._gexc.NotFound:
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
        except self._gexc.Conflict:  # another runner made it first: the same content by its name
            pass
        except (self._gexc.BadRequest, self._retry.HttpAnswer) as exc:
            raise ShapeError(
                f"Compute Engine refused the template for this shape: {exc.message}"
            ) from None
        found = self._templates.get(request={"project": self.project, "instance_template": name})
        return str(found.self_link), True

    def _ensure_group(
        self, name: str, base: dict[str, Any], template_url: str, digest: str, zones: list[str]
    ) -> bool:
        try:
            self._managers.get(request=self._request(name))
            return False
        except self._gexc.NotFound:
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
        except self._gexc.Conflict:
            return False
        except (self._gexc.BadRequest, self._retry.HttpAnswer) as exc:
            raise ShapeError(
                f"Compute Engine refused the group for this shape: {exc.message}"
            ) from None
        return True

    # -- removing (runner.backends.gcp.shapes.cleanup)
    # ---------------------------------------------------

    def list_groups(self) -> list[Any]:
        """Every instance group in the deployment's zone or region."""
        try:
            return list(self._managers.list(request={"project": self.project, **self._where}))
        except self._gexc.GoogleAPICallError as exc:
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
        except self._gexc.NotFound:
            pass
        except self._failures as exc:
            raise ShapeError(f"could not {what}: {_said(exc)}") from None
        request = {"project": self.project, "instance_template": name}
        try:
            self._mutate(f"delete instance template {name}", self._templates, request, "delete")
        except self._gexc.NotFound:
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
        retry policy (:func:`worker.backends.gcp.retry.run_operation`)."""

        def wait(operation: Any) -> Any:
            ops, where = self._global_ops, {}
            if operation.zone:
                ops, where = self._group_ops, {"zone": operation.zone.rsplit("/", 1)[-1]}
            elif operation.region:
                ops, where = self._group_ops, {"region": operation.region.rsplit("/", 1)[-1]}
            return ops.wait(request={"project": self.project, **where, "operation": operation.name})

        self._retry.run_operation(
            lambda: getattr(client, f"{verb}_unary")(request=request),
            wait,
            what=what,
            clock=self.clock,
            timeout=timeout,
        )


def _said(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc)
