"""The fleet as a Compute Engine managed instance group (MIG) of Spot VMs.

The group grows by raising its target size (the MIG creates the VMs from the instance template,
and recreates any that Spot preempts). It shrinks only through ``deleteInstances`` with the names
of idle instances, which removes exactly those VMs and lowers the target size with them; a blind
resize down could pick a busy VM. A zonal group is addressed by its zone, a regional one by its
region. ``CFLOW_COMPUTE_ENDPOINT`` points the client elsewhere (an ``http://`` endpoint is a
test fake and gets anonymous credentials).

Limits from Compute Engine's documentation that this module keeps to: ``deleteInstances`` takes
at most 1,000 instances a request (larger deletes are batched); lists are paged (the client's
pager follows ``nextPageToken``); a zonal group holds at most 1,000 VMs and a regional one 2,000;
every call goes through Compute's retry policy (:mod:`worker.backends.gcp.retry`: 5xx, rate
limits into the next minute, ``resourceNotReady``, timeouts and reset connections are retried
and said, never given up on), each mutation with one ``requestId`` across its retries, while a
permission error or a missing group stays one clear line. Instances the group cannot create
(quota) carry their ``lastAttempt.errors``; VMs that failed to boot or could not remove
themselves are read from the markers they leave in the bucket (``fleet/_problems/<vm>.json``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials

from runner.backends.gcp.compute import compute_v1
from runner.backends.gcp.instances import classify_instances, instance_name
from runner.backends.gcp.problems import ProblemReports
from runner.engine.fleet import Fleet, Instance
from worker.backends.gcp.retry import COMPUTE, request_id, retrying
from worker.backends.gcp.vm import COMPUTE_ENDPOINT_ENV, agent_log_key
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, ConfigError, NotFound
from worker.store import Store

if TYPE_CHECKING:  # only agent_log reads the bucket, through the caller's store
    from worker.backends.gcp.gcs import GcsStore

log = logging.getLogger("cflow.runner")

OPERATION_TIMEOUT = 120.0  # seconds to wait for a resize to be accepted
POLL_SECONDS = 2.0  # between instance listings while waiting for the group to empty
DELETE_BATCH = 1000  # instances per deleteInstances request: the API's limit
LIST_PAGE = 500  # listManagedInstances maxResults: the API's most
ZONAL_MAX_SIZE = 1000  # VMs a zonal managed instance group can hold
REGIONAL_MAX_SIZE = 2000  # VMs a regional one can hold
REQUEST_TIMEOUT = 60.0  # seconds one Compute request may take before it is retried


def compute_client_options() -> tuple[Credentials | None, ClientOptions | None]:
    """Credentials and endpoint for Compute Engine clients (ADC, unless a test endpoint)."""
    endpoint = os.environ.get(COMPUTE_ENDPOINT_ENV)
    if not endpoint:
        return None, None
    credentials = AnonymousCredentials() if endpoint.startswith("http://") else None
    return credentials, ClientOptions(api_endpoint=endpoint)


def size_limit(*, zonal: bool) -> int:
    """The most VMs a zonal or regional managed instance group holds."""
    return ZONAL_MAX_SIZE if zonal else REGIONAL_MAX_SIZE


def check_size(size: int, *, zonal: bool) -> None:
    """Refuse a group size past Compute Engine's limit, with one clear line."""
    limit = size_limit(zonal=zonal)
    if size > limit:
        kind = "zonal" if zonal else "regional"
        hint = " (deploy a regional group for up to 2,000)" if zonal else ""
        raise ConfigError(f"{size} VMs is more than a {kind} instance group holds ({limit}){hint}")


class GceFleet(Fleet):
    """A managed instance group as a :class:`runner.engine.fleet.Fleet`.

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
        store: Store | None = None,
        say: Callable[[str], None] | None = None,
    ):
        if not zone and not region:
            raise ConfigError(f"instance group {group} needs a zone or a region")
        self.project = project
        self.group = group
        self.clock = clock
        self.store = store  # the bucket, where VMs report failed boots (None: not read)
        self.say = say or log.warning  # what a retried call waits for
        self.max_size = size_limit(zonal=bool(zone))
        self.deletes_by_itself = True  # a deleted VM stops whatever its guest does
        self.lists_starting = True  # a new VM is CREATING, then boots, for a minute or more
        self._problems: list[str] = []
        self._reports = ProblemReports(store, clock)
        self._announced: set[str] = set()
        where, place = ("zone", zone) if zone else ("region", region)
        assert place
        self._where: dict[str, str] = {where: place}
        self.describe = f"instance group {group} in {where} {place}"
        self._managers, self._operations, self._delete_field = _group_clients(zonal=bool(zone))
        self._pending: list[str] = []  # delete operations not yet seen finished

    def _request(self, **fields: Any) -> dict[str, Any]:
        return {
            "project": self.project,
            "instance_group_manager": self.group,
            **self._where,
            **fields,
        }

    def _call(self, action: str, method: str, **fields: Any) -> Any:
        """One call of the group's API through Compute's retry policy. A mutation carries a
        ``request_id`` in ``fields``, the same in every retry: Compute ignores a repeat of a
        request it already took, so a resize or a delete whose answer was lost is not done
        twice. Transient answers are retried for as long as they last; a permanent one raises
        one line."""

        def once() -> Any:
            request = self._request(**fields)
            return getattr(self._managers, method)(
                request=request, retry=None, timeout=REQUEST_TIMEOUT
            )

        try:
            return self._retrying(f"{action} {self.describe}", once)
        except gexc.GoogleAPICallError as exc:
            self._raise_api_error(action, exc)

    def _retrying(self, what: str, call: Callable[[], Any]) -> Any:
        return retrying(COMPUTE, call, what=what, say=self.say, clock=self.clock)

    def _raise_api_error(self, action: str, exc: gexc.GoogleAPICallError) -> None:
        if isinstance(exc, gexc.NotFound):
            raise BackendError(
                f"{self.describe} does not exist in project {self.project}; "
                "check the deployment (`runner doctor`)"
            ) from None
        if isinstance(exc, gexc.Forbidden | gexc.Unauthorized):
            raise BackendError(
                f"no permission to {action} {self.describe}: {exc.message}"
            ) from None
        raise BackendError(f"could not {action} {self.describe}: {exc.message}") from None

    # -- the Fleet interface -------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the group exists (other errors, such as a missing permission, raise)."""
        try:
            self._retrying(
                f"read {self.describe}",
                lambda: self._managers.get(
                    request=self._request(), retry=None, timeout=REQUEST_TIMEOUT
                ),
            )
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as exc:
            raise BackendError(f"could not read {self.describe}: {exc.message}") from None
        return True

    def target_size(self) -> int:
        """How many instances the group is asked to keep."""
        return int(self._call("read", "get").target_size)

    def managed_instances(self) -> list[Any]:
        """The group's instances as the API lists them: every page, each request retried on
        rate limits (a page lost to one must not shorten the list: VMs would seem gone)."""
        out: list[Any] = []
        token = ""
        while True:
            pager = self._call(
                "list the instances of",
                "list_managed_instances",
                page_token=token,
                max_results=LIST_PAGE,
            )
            page = next(iter(pager.pages))  # the response of this call; no request of its own
            out.extend(page.managed_instances)
            token = page.next_page_token
            if not token:
                return out

    def instances(self) -> list[Instance]:
        reported = self._reports.read()
        managed = self.managed_instances()
        self._reports.drop_stale(reported, {instance_name(m) for m in managed})
        out, quota = classify_instances(managed, reported)
        problems = [f"{n} VM{'s' if n > 1 else ''} cannot start: {e}" for e, n in quota.items()]
        for error in quota.keys() - self._announced:  # said once per distinct error
            self._announced.add(error)
            log.warning("%s: VMs cannot start: %s", self.describe, error)
        for i in out:
            if i.removable:
                problems.append(f"VM {i.name} {i.error}")
                if i.name not in self._reports.said:
                    self._reports.said.add(i.name)
                    log.warning("VM %s %s; removing it", i.name, i.error)
        self._problems = problems
        return sorted(out, key=lambda i: i.name)

    def problems(self) -> list[str]:
        """What the last :meth:`instances` found wrong: creation errors, failed boots."""
        return list(self._problems)

    def grow(self, count: int) -> list[str]:
        """Raise the target size by ``count``; the names the group gave the new instances."""
        if count <= 0:
            return []
        before = {i.name for i in self.instances()}
        # resize sets an absolute size and has no precondition, so the size is computed from a
        # read made just before it: a worker that deletes itself in between leaves one VM too
        # many, which idles and is deleted by name. The alternatives were weighed and refused:
        # createInstances adds atomically but gives every VM a per-instance config (a stateful
        # group, which a regional group's proactive redistribution refuses), and patching
        # targetSize under the group's fingerprint is not documented to fail on a concurrent
        # deleteInstances. The requestId makes the retries of this one resize a single resize.
        size = self.target_size() + count
        check_size(size, zonal="zone" in self._where)
        log.info("growing %s to %d instances", self.describe, size)
        operation = self._call("resize", "resize_unary", size=size, request_id=request_id())
        self._wait(operation, "resize")
        return sorted({i.name for i in self.instances()} - before)

    def delete(self, names: Iterable[str]) -> None:
        """Delete these instances by name (never a resize down), without waiting."""
        wanted = set(names)
        if not wanted:
            return
        urls = [m.instance for m in self.managed_instances() if instance_name(m) in wanted]
        for start in range(0, len(urls), DELETE_BATCH):
            body = {
                "instances": urls[start : start + DELETE_BATCH],
                "skip_instances_on_validation_error": True,
            }
            operation = self._call(
                "delete instances of",
                "delete_instances_unary",
                request_id=request_id(),
                **{self._delete_field: body},
            )
            self._pending.append(operation.name)
        self._reports.forget(wanted)

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
        return self._retrying(
            f"read operation {name}",
            lambda: getattr(self._operations, method)(
                request=request, retry=None, timeout=REQUEST_TIMEOUT
            ),
        )

    def _wait(self, operation: Any, action: str) -> None:
        """Wait for an operation to end. One that ends in error, or outlasts the timeout, is
        said, not raised: the group is read afresh at the next look and asked again then."""
        deadline = self.clock.monotonic() + OPERATION_TIMEOUT
        try:
            while not _is_done(operation):
                if self.clock.monotonic() >= deadline:
                    self.say(f"{action} of {self.describe} is still running; going on")
                    return
                operation = self._operation(operation.name, "wait")
            _raise_for(operation, f"{action} of {self.describe}")
        except gexc.GoogleAPICallError as exc:
            self._raise_api_error(f"follow the {action} of", exc)
        except BackendError as exc:
            self.say(f"{exc}; asking again at the next look")

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


def _group_clients(*, zonal: bool) -> tuple[Any, Any, str]:
    """A zonal or a regional group's managers and operations clients, and the field of a
    ``deleteInstances`` request that holds its body."""
    credentials, options = compute_client_options()
    if zonal:
        return (
            compute_v1.InstanceGroupManagersClient(credentials=credentials, client_options=options),
            compute_v1.ZoneOperationsClient(credentials=credentials, client_options=options),
            "instance_group_managers_delete_instances_request_resource",
        )
    return (
        compute_v1.RegionInstanceGroupManagersClient(
            credentials=credentials, client_options=options
        ),
        compute_v1.RegionOperationsClient(credentials=credentials, client_options=options),
        "region_instance_group_managers_delete_instances_request_resource",
    )


def _is_done(operation: Any) -> bool:
    return bool(operation.status == compute_v1.Operation.Status.DONE)


def _raise_for(operation: Any, what: str) -> None:
    errors = list(operation.error.errors) if operation.error else []
    if errors:
        detail = "; ".join(f"{e.code}: {e.message}" for e in errors)
        raise BackendError(f"{what} failed: {detail}")


def agent_log(store: GcsStore, worker: str) -> bytes:
    """A worker VM's own agent log (``fleet/<vm>/agent.log``), kept after the VM is gone.

    Raises:
        NotFound: that worker never uploaded one.
    """
    try:
        return store.get(agent_log_key(worker))
    except NotFound:
        raise NotFound(f"no agent log for worker {worker} in gs://{store.bucket_name}") from None


def agent_logs(store: GcsStore) -> list[str]:
    """Workers that left an agent log, by name."""
    return sorted(
        key.split("/")[1]
        for key in store.list("fleet/", suffix="/agent.log")
        if key.count("/") == 2
    )
