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
from typing import TYPE_CHECKING, Any

from runner.backends.gcp.shapes.checks import ShapeChecks
from runner.backends.gcp.shapes.images import BootImages
from runner.backends.gcp.shapes.model import Shape, ShapedGroup, ShapeError, is_spot
from runner.backends.gcp.shapes.resources import ShapeResources
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
    """Check shapes against a zone (or region) and make (or reuse) their template and group
    (the calls that make, list and delete them are :class:`ShapeResources`').

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
        self.resources = ShapeResources(
            project=project, group=group, zone=zone, region=self.region, clock=clock
        )
        self.images = BootImages(
            project=project, client=self.resources.images, gexc=self.resources.gexc
        )
        self.checks = ShapeChecks(project=project, region=self.region)

    @property
    def where(self) -> str:
        return self.resources.where

    def close(self) -> None:
        self.resources.close()
        self.checks.close()

    def base(self) -> tuple[dict[str, Any], str, dict[str, Any]]:
        """The deployment's group (REST JSON), its template's name, and that template."""
        return self.resources.base()

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
        template_url, made_template = self.resources.ensure_template(name, base_name, derived)
        made_group = self.resources.ensure_group(name, base_group, template_url, digest, zones)
        machine_type = str(derived.get("machineType", ""))
        made = made_template or made_group
        return ShapedGroup(name, name, shape, made, machine_type, digest, queue)

    # -- removing (runner.backends.gcp.shapes.cleanup) --------------------------------------

    def list_groups(self) -> list[Any]:
        """Every instance group in the deployment's zone or region."""
        return self.resources.list_groups()

    def group_instances(self, name: str) -> list[Any]:
        """The instances group ``name`` has (creating, running or being deleted)."""
        return self.resources.group_instances(name)

    def delete_group(self, name: str, *, timeout: float = OPERATION_TIMEOUT) -> None:
        """Delete group ``name`` (gone already is fine), then its template of the same name."""
        self.resources.delete_group(name, timeout=timeout)
