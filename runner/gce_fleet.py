"""The fleet as a Compute Engine managed instance group (MIG) of Spot VMs.

The group grows by raising its target size (the MIG creates the VMs from the instance template,
and recreates any that Spot preempts). It shrinks only through ``deleteInstances`` with the names
of idle instances, which removes exactly those VMs and lowers the target size with them; a blind
resize down could pick a busy VM. A zonal group is addressed by its zone, a regional one by its
region. ``CFLOW_COMPUTE_ENDPOINT`` points the client elsewhere (an ``http://`` endpoint is a
test fake and gets anonymous credentials).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from runner.fleet import Fleet, Instance
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, ConfigError
from worker.gcp import COMPUTE_ENDPOINT_ENV

log = logging.getLogger("cflow.runner")

OPERATION_TIMEOUT = 120.0  # seconds to wait for a resize to be accepted
POLL_SECONDS = 2.0  # between instance listings while waiting for the group to empty
_STOPPING_ACTIONS = {"DELETING", "ABANDONING", "STOPPING", "SUSPENDING"}


def compute_client_options() -> tuple[Credentials | None, ClientOptions | None]:
    """Credentials and endpoint for Compute Engine clients (ADC, unless a test endpoint)."""
    endpoint = os.environ.get(COMPUTE_ENDPOINT_ENV)
    if not endpoint:
        return None, None
    credentials = AnonymousCredentials() if endpoint.startswith("http://") else None
    return credentials, ClientOptions(api_endpoint=endpoint)


def instance_name(managed: Any) -> str:
    """A managed instance's name (the MIG names it before the VM exists)."""
    return str(managed.name or managed.instance.rsplit("/", 1)[-1])


def instance_status(managed: Any) -> str:
    """``starting`` | ``running`` | ``stopping``, from the MIG's current action."""
    action = managed.current_action or "NONE"
    if action in _STOPPING_ACTIONS:
        return "stopping"
    if action == "NONE" and managed.instance_status == "RUNNING":
        return "running"
    return "starting"


class GceFleet(Fleet):
    """A managed instance group as a :class:`runner.fleet.Fleet`.

    Args:
        project: the group's project.
        group: the instance group manager's name.
        zone: the zone of a zonal group.
        region: the region of a regional group (used when ``zone`` is empty).
    """

    def __init__(
        self,
        *,
        project: str,
        group: str,
        zone: str | None = None,
        region: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        if not zone and not region:
            raise ConfigError(f"instance group {group} needs a zone or a region")
        self.project = project
        self.group = group
        self.clock = clock
        credentials, options = compute_client_options()
        if zone:
            self._where: dict[str, str] = {"zone": zone}
            self.describe = f"instance group {group} in zone {zone}"
            self._managers: Any = compute_v1.InstanceGroupManagersClient(
                credentials=credentials, client_options=options
            )
            self._operations: Any = compute_v1.ZoneOperationsClient(
                credentials=credentials, client_options=options
            )
            self._delete_field = "instance_group_managers_delete_instances_request_resource"
        else:
            assert region
            self._where = {"region": region}
            self.describe = f"instance group {group} in region {region}"
            self._managers = compute_v1.RegionInstanceGroupManagersClient(
                credentials=credentials, client_options=options
            )
            self._operations = compute_v1.RegionOperationsClient(
                credentials=credentials, client_options=options
            )
            self._delete_field = "region_instance_group_managers_delete_instances_request_resource"
        self._pending: list[str] = []  # delete operations not yet seen finished

    def _request(self, **fields: Any) -> dict[str, Any]:
        return {
            "project": self.project,
            "instance_group_manager": self.group,
            **self._where,
            **fields,
        }

    def _call(self, action: str, method: str, **fields: Any) -> Any:
        try:
            return getattr(self._managers, method)(request=self._request(**fields))
        except gexc.NotFound:
            raise BackendError(
                f"{self.describe} does not exist in project {self.project}; "
                "check the deployment (`runner doctor`)"
            ) from None
        except (gexc.Forbidden, gexc.Unauthorized) as exc:
            raise BackendError(
                f"no permission to {action} {self.describe}: {exc.message}"
            ) from None
        except gexc.GoogleAPICallError as exc:
            raise BackendError(f"could not {action} {self.describe}: {exc.message}") from None

    # -- the Fleet interface -------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the group exists (other errors, such as a missing permission, raise)."""
        try:
            self._managers.get(request=self._request())
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as exc:
            raise BackendError(f"could not read {self.describe}: {exc.message}") from None
        return True

    def target_size(self) -> int:
        """How many instances the group is asked to keep."""
        return int(self._call("read", "get").target_size)

    def managed_instances(self) -> list[Any]:
        """The group's instances as the API lists them (every page)."""
        return list(self._call("list the instances of", "list_managed_instances"))

    def instances(self) -> list[Instance]:
        return sorted(
            (Instance(instance_name(m), instance_status(m)) for m in self.managed_instances()),
            key=lambda i: i.name,
        )

    def grow(self, count: int) -> list[str]:
        """Raise the target size by ``count``; the names the group gave the new instances."""
        if count <= 0:
            return []
        before = {i.name for i in self.instances()}
        size = self.target_size() + count
        log.info("growing %s to %d instances", self.describe, size)
        operation = self._call("resize", "resize_unary", size=size)
        self._wait(operation, "resize")
        return sorted({i.name for i in self.instances()} - before)

    def delete(self, names: Iterable[str]) -> None:
        """Delete these instances by name (never a resize down), without waiting."""
        wanted = set(names)
        if not wanted:
            return
        urls = [m.instance for m in self.managed_instances() if instance_name(m) in wanted]
        if not urls:
            return
        body = {"instances": urls, "skip_instances_on_validation_error": True}
        operation = self._call(
            "delete instances of", "delete_instances_unary", **{self._delete_field: body}
        )
        self._pending.append(operation.name)

    def wait_empty(self, timeout: float) -> bool:
        deadline = self.clock.monotonic() + timeout
        while True:
            self._check_pending()
            if not self.managed_instances():
                return True
            if self.clock.monotonic() >= deadline:
                return False
            self.clock.sleep(POLL_SECONDS)

    def close(self) -> None:
        for client in (self._managers, self._operations):
            transport = getattr(client, "transport", None)
            if transport is not None:
                transport.close()

    # -- operations ----------------------------------------------------------------------

    def _operation(self, name: str, method: str = "get") -> Any:
        request = {"project": self.project, "operation": name, **self._where}
        return getattr(self._operations, method)(request=request)

    def _wait(self, operation: Any, action: str) -> None:
        deadline = self.clock.monotonic() + OPERATION_TIMEOUT
        while not _is_done(operation):
            if self.clock.monotonic() >= deadline:
                raise BackendError(f"{action} of {self.describe} did not finish in time")
            operation = self._operation(operation.name, "wait")
        _raise_for(operation, f"{action} of {self.describe}")

    def _check_pending(self) -> None:
        still = []
        for name in self._pending:
            try:
                operation = self._operation(name)
            except gexc.GoogleAPICallError as exc:
                log.warning("cannot read operation %s: %s", name, exc)
                continue
            if _is_done(operation):
                try:
                    _raise_for(operation, f"deleting instances of {self.describe}")
                except BackendError as exc:
                    log.warning("%s", exc)
            else:
                still.append(name)
        self._pending = still


def _is_done(operation: Any) -> bool:
    return bool(operation.status == compute_v1.Operation.Status.DONE)


def _raise_for(operation: Any, what: str) -> None:
    errors = list(operation.error.errors) if operation.error else []
    if errors:
        detail = "; ".join(f"{e.code}: {e.message}" for e in errors)
        raise BackendError(f"{what} failed: {detail}")
