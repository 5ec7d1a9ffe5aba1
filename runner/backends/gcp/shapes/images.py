"""The boot image a shape swaps in (a GPU image, or a container image), read before it is used.

A shape with GPUs or an ``--image`` boots another image than the deployment's, and Compute
Engine refuses to create a VM whose boot disk is smaller than its image ("Requested disk size
cannot be smaller than the image size (50 GB)"); in a managed group that refusal never reaches
the caller: the group keeps the VM "creating" for ever. So the runner reads the image
(``images.getFromFamily`` for a family, ``images.get`` for an image) before it makes the
template, sizes the boot disk to at least the image's ``diskSizeGb``, and refuses, in one line
naming the setting to change, an image or family that does not exist (Deep Learning VM families
move on: a family that resolved last year may be gone).
"""

from __future__ import annotations

import re
from typing import Any

from runner.backends.gcp.shapes.checks import rest_json
from runner.backends.gcp.shapes.model import Shape, ShapeError

_FAMILY = re.compile(r"(?:^|/)projects/(?P<project>[^/]+)/global/images/family/(?P<family>[^/]+)$")
_IMAGE = re.compile(r"(?:^|/)projects/(?P<project>[^/]+)/global/images/(?P<name>[^/]+)$")
# Where each swapped-in image comes from: the deployment setting (stack variable, environment).
SETTINGS = {
    "gpu": "gpu_image (a stack variable, or CFLOW_GPU_IMAGE)",
    "engine": "container_image (a stack variable, or CFLOW_CONTAINER_IMAGE)",
}
LIST_DLVM = (
    "gcloud compute images list --project deeplearning-platform-release --no-standard-images"
)


class BootImages:
    """Reads boot images through a Compute Engine ``ImagesClient``.

    Args:
        project: the deployment's project (an image named without one is in it).
        client: a ``compute_v1.ImagesClient``.
        gexc: ``google.api_core.exceptions``.
    """

    def __init__(self, *, project: str, client: Any, gexc: Any) -> None:
        self.project, self._client, self._gexc = project, client, gexc
        self._sizes: dict[str, int] = {}

    def describe(self, image: str) -> dict[str, Any]:
        """The image (REST JSON) ``image`` names: a family's newest, or the image itself.

        Raises:
            ShapeError: the image or family does not exist, or cannot be read.
        """
        if m := _FAMILY.search(image):
            call, request = "get_from_family", {"project": m["project"], "family": m["family"]}
        elif m := _IMAGE.search(image):
            call, request = "get", {"project": m["project"], "image": m["name"]}
        else:  # a bare name: an image of the deployment's project
            call, request = "get", {"project": self.project, "image": image.rsplit("/", 1)[-1]}
        try:
            return rest_json(getattr(self._client, call)(request=request))
        except self._gexc.NotFound:
            raise ShapeError(f"boot image {image} does not exist") from None
        except self._gexc.GoogleAPICallError as exc:
            raise ShapeError(f"could not read boot image {image}: {exc.message}") from None

    def disk_gb(self, image: str, kind: str) -> int:
        """The smallest boot disk (GB) ``image`` fits on; one line naming the deployment setting
        to change (``kind``: "gpu" or "engine") when it does not resolve."""
        if image not in self._sizes:
            try:
                found = self.describe(image)
            except ShapeError as refused:
                hint = f"; list the current families with `{LIST_DLVM}`" if kind == "gpu" else ""
                raise ShapeError(
                    f"{refused}: set the deployment's {SETTINGS[kind]} to one that exists{hint}"
                ) from None
            self._sizes[image] = int(found.get("diskSizeGb") or 0)
        return self._sizes[image]

    def disk_for(
        self, shape: Shape, props: dict[str, Any], boot: tuple[str, str] | None
    ) -> int | None:
        """The boot disk (GB) VMs of ``shape`` get: as asked, else the deployment's template's
        (``props``), never smaller than the image they boot (``boot``: the image and its kind,
        None for the deployment's own); None keeps the deployment's as it is."""
        need = self.disk_gb(*boot) if boot is not None else 0
        if boot is not None and shape.disk_gb is not None and shape.disk_gb < need:
            raise ShapeError(
                f"--disk-gb {shape.disk_gb} is smaller than boot image {boot[0]} ({need} GB):"
                f" give --disk-gb {need} or more"
            )
        if shape.disk_gb is not None:
            return shape.disk_gb
        disks = [d for d in props.get("disks", []) if d.get("boot")]
        have = int((disks[0].get("initializeParams") or {}).get("diskSizeGb") or 0) if disks else 0
        return need if need > have else None
