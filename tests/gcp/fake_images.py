"""Boot images for the fake Compute API: ``images.get``, ``images.getFromFamily``, and the
refusal of a boot disk smaller than its image.

An image family resolves when the VM is created (a template may name a family whose newest
image changes later), so Compute Engine compares a boot disk with its image when it creates the
VM, not when a template is inserted; a VM of a managed group whose disk is too small is never
created, and the group records the API's 400 in ``lastAttempt.errors``. Its text, as Compute
Engine answers it: ``Invalid value for field 'resource.disks[0].initializeParams.diskSizeGb':
'20'. Requested disk size cannot be smaller than the image size (50 GB)``.

Images are keyed ``(project, name)`` with their family and ``diskSizeGb``; a family resolves to
its last image. Images and families not in the table are 404 ``notFound``, as the API answers an
image family that has moved on or never existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

BASE = "https://www.googleapis.com/compute/v1"
# The default GPU image family, and the stack's boot image (the fake's deployment template
# names ``global/images/cflow-1`` in the deployment's project).
DLVM_PROJECT = "deeplearning-platform-release"
DLVM_FAMILY = "common-cu124-debian-12-py310"
DLVM_DISK_GB = 50

_FAMILY = re.compile(
    r"^(?:.*/)?projects/(?P<project>[^/]+)/global/images/family/(?P<family>[^/?]+)$"
)
_IMAGE = re.compile(r"^(?:.*/)?projects/(?P<project>[^/]+)/global/images/(?P<name>[^/?]+)$")


@dataclass(frozen=True)
class Image:
    project: str
    name: str
    family: str
    disk_gb: int

    def resource(self) -> dict[str, Any]:
        """The image as ``images.get`` returns it (REST JSON; int64 fields are strings)."""
        link = f"{BASE}/projects/{self.project}/global/images/{self.name}"
        return {
            "kind": "compute#image",
            "id": str(abs(hash((self.project, self.name))) % 10**18),
            "name": self.name,
            "family": self.family,
            "diskSizeGb": str(self.disk_gb),
            "status": "READY",
            "selfLink": link,
        }


def default_images(project: str) -> list[Image]:
    """The stack's image in the deployment's project, and a Deep Learning VM image family."""
    return [
        Image(project, "cflow-1", "cflow", 10),
        Image(DLVM_PROJECT, f"{DLVM_FAMILY}-v20261101", DLVM_FAMILY, DLVM_DISK_GB),
    ]


class FakeImages:
    """The image table of a fake Compute API."""

    def __init__(self, images: list[Image]) -> None:
        self.images = list(images)

    def add(self, image: Image) -> None:
        self.images.append(image)

    def find(self, source: str) -> Image | None:
        """The image a ``sourceImage`` names (a family resolves to its newest), or None."""
        if m := _FAMILY.match(source):
            found = [i for i in self.images if (i.project, i.family) == (m["project"], m["family"])]
            return found[-1] if found else None
        if m := _IMAGE.match(source):
            return next(
                (i for i in self.images if (i.project, i.name) == (m["project"], m["name"])),
                None,
            )
        return None

    def handle(self, path: str) -> tuple[int, Any] | None:
        """``GET .../global/images/family/F`` and ``GET .../global/images/NAME``; None for any
        other path."""
        if "/global/images/" not in path:
            return None
        image = self.find(path)
        if image is None:
            resource = path.split("/compute/v1/", 1)[-1]
            return _not_found(resource)
        return 200, image.resource()

    def disk_refusal(self, props: dict[str, Any]) -> dict[str, str] | None:
        """The creation error of a VM with instance template ``props`` whose boot disk is
        smaller than its image (``lastAttempt.errors`` entry), or None."""
        for index, disk in enumerate(props.get("disks", [])):
            params = disk.get("initializeParams") or {}
            image = self.find(str(params.get("sourceImage", "")))
            size = params.get("diskSizeGb")
            if image is None or size is None or int(size) >= image.disk_gb:
                continue
            return {
                "code": "INVALID_FIELD_VALUE",
                "message": (
                    f"Invalid value for field 'resource.disks[{index}].initializeParams."
                    f"diskSizeGb': '{size}'. Requested disk size cannot be smaller than the "
                    f"image size ({image.disk_gb} GB)"
                ),
            }
        return None


def _not_found(resource: str) -> tuple[int, Any]:
    message = f"The resource '{resource}' was not found"
    return 404, {
        "error": {
            "code": 404,
            "message": message,
            "errors": [{"message": message, "domain": "global", "reason": "notFound"}],
        }
    }
