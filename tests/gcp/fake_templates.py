"""Instance templates, machine types and accelerator types of the fake Compute API.

``FakeCompute`` (tests/gcp/fake_compute.py) serves these through :class:`TemplateApi`, as the
API answers them: ``instanceTemplates.get`` / ``insert`` / ``delete`` (the deployment's template
is always there), ``machineTypes.get`` and ``acceleratorTypes.get``. The refusals are the
documented ones: a name that is not RFC 1035 (400 ``invalid``), a name taken (409
``alreadyExists``), GPUs with ``onHostMaintenance`` other than ``TERMINATE`` (400), GPUs attached
to a series other than ``n1`` (400), a template a group still uses (400
``resourceInUseByAnotherResource``), and 404 ``notFound`` for what does not exist.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from tests.gcp.fault_compute import BASE, api_error

if TYPE_CHECKING:
    from tests.gcp.fake_vms import Group

NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")  # RFC 1035, as resource names must be
# Accelerator-optimized machine types come with their GPUs: type -> (accelerator, count).
G2_GPUS = {4: 1, 8: 1, 12: 1, 16: 1, 24: 2, 32: 1, 48: 4, 96: 8}
_NAME = NAME


class TemplateApi:
    """The template, machine type and accelerator endpoints of a fake Compute API."""

    group: Group
    groups: dict[str, Group]
    templates: dict[str, dict[str, Any]]
    deleted_templates: list[str]
    machine_type: str
    metadata: dict[str, str]
    accelerators: frozenset[str]
    zone_accelerators: dict[str, frozenset[str]]

    if TYPE_CHECKING:  # FakeCompute's

        def _operation(self, kind: str, target: str, g: Group | None = None) -> dict[str, Any]: ...

    def _template(self, name: str) -> tuple[int, Any]:
        if name in self.templates:
            return 200, self.templates[name]
        project = self.group.project
        if name != f"{self.group.name}-template" or name in self.deleted_templates:
            resource = f"projects/{project}/global/instanceTemplates/{name}"
            return api_error(404, f"The resource '{resource}' was not found")
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
            return api_error(404, f"The resource '{resource}' was not found")
        users = [g for g in self.groups.values() if g.template == name]
        if users:
            user = users[0]
            return api_error(
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
            return api_error(404, f"The resource '{resource}' was not found")
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
            return api_error(404, f"The resource '{resource}' was not found")
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
            return api_error(
                400,
                f"Invalid value for field 'resource.name': '{name}'. Must be a match of regex "
                "'(?:[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?)'",
            )
        link = f"{BASE}/projects/{project}/global/instanceTemplates/{name}"
        if name in self.templates or name == f"{self.group.name}-template":
            resource = f"projects/{project}/global/instanceTemplates/{name}"
            return api_error(
                409, f"The resource '{resource}' already exists", reason="alreadyExists"
            )
        props = body.get("properties", {})
        machine_type = str(props.get("machineType", ""))
        gpus = props.get("guestAccelerators") or []
        bundled = machine_type.startswith("g2-")
        maintenance = props.get("scheduling", {}).get("onHostMaintenance", "MIGRATE")
        if (gpus or bundled) and maintenance != "TERMINATE":
            return api_error(
                400,
                "Instances with guest accelerators do not support live migration.",
                reason="badRequest",
            )
        if gpus and not machine_type.startswith("n1-"):
            return api_error(
                400,
                f"Invalid resource usage: 'Machine type {machine_type} does not support "
                "accelerators.'",
            )
        self.templates[name] = {"kind": "compute#instanceTemplate", **body, "selfLink": link}
        return 200, self._global_operation("compute.instanceTemplates.insert", link)
