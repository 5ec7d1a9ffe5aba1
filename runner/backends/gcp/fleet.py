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
rate limits come back as 403 ``rateLimitExceeded`` (or 429) and are retried with backoff, while
a real permission error stays one clear line. Instances the group cannot create (quota) carry
their ``lastAttempt.errors``; VMs that failed to boot or could not remove themselves are read
from the markers they leave in the bucket (``fleet/_problems/<vm>.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from runner.engine.fleet import Fleet, Instance
from worker.backends.gcp.vm import (
    COMPUTE_ENDPOINT_ENV,
    PROBLEMS_PREFIX,
    agent_log_key,
    is_rate_limited,
)
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, ConfigError, NotFound
from worker.store import Store

if TYPE_CHECKING:  # only agent_log reads the bucket, through the caller's store
    from worker.backends.gcp.gcs import GcsStore

log = logging.getLogger("cflow.runner")

OPERATION_TIMEOUT = 120.0  # seconds to wait for a resize to be accepted
POLL_SECONDS = 2.0  # between instance listings while waiting for the group to empty
_STOPPING_ACTIONS = {"DELETING", "ABANDONING", "STOPPING", "SUSPENDING"}
DELETE_BATCH = 1000  # instances per deleteInstances request: the API's limit
LIST_PAGE = 500  # listManagedInstances maxResults: the API's most
STALE_REPORT_SECONDS = 120.0  # a problem report of a VM no longer in the group is dropped after
ZONAL_MAX_SIZE = 1000  # VMs a zonal managed instance group can hold
REGIONAL_MAX_SIZE = 2000  # VMs a regional one can hold
RATE_LIMIT_TRIES = 6  # calls refused for rate limits are retried this many times in all...
RATE_LIMIT_BACKOFF = (1.0, 16.0)  # ...pausing from the first to at most the second (seconds)


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


def instance_error(managed: Any) -> str | None:
    """``CODE: message`` of the group's last failed attempt to create this instance, if any."""
    attempt = getattr(managed, "last_attempt", None)
    errors = list(attempt.errors.errors) if attempt and attempt.errors else []
    if not errors or instance_status(managed) == "running":
        return None
    first = errors[0]
    return f"{first.code}: {first.message}".strip()


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


def instance_status(managed: Any) -> str:
    """``starting`` | ``running`` | ``stopping``, from the MIG's current action."""
    action = managed.current_action or "NONE"
    if action in _STOPPING_ACTIONS:
        return "stopping"
    if action == "NONE" and managed.instance_status == "RUNNING":
        return "running"
    return "starting"


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
    ):
        if not zone and not region:
            raise ConfigError(f"instance group {group} needs a zone or a region")
        self.project = project
        self.group = group
        self.clock = clock
        self.store = store  # the bucket, where VMs report failed boots (None: not read)
        self.max_size = size_limit(zonal=bool(zone))
        self._problems: list[str] = []
        self._reports = ProblemReports(store, clock)
        self._announced: set[str] = set()
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
        return self._retrying(
            action, lambda: getattr(self._managers, method)(request=self._request(**fields))
        )

    def _retrying(self, action: str, call: Callable[[], Any]) -> Any:
        """``call()``, retrying rate limits (403 rateLimitExceeded, 429) with backoff."""
        pause = RATE_LIMIT_BACKOFF[0]
        for attempt in range(1, RATE_LIMIT_TRIES + 1):
            try:
                return self._once(action, call)
            except _RateLimited as limited:
                if attempt == RATE_LIMIT_TRIES:
                    raise BackendError(
                        f"could not {action} {self.describe}: still rate limited after "
                        f"{attempt} tries ({limited})"
                    ) from None
                log.info("rate limited (%s); again in %.0f s", limited, pause)
                self.clock.sleep(pause)
                pause = min(pause * 2, RATE_LIMIT_BACKOFF[1])
        raise AssertionError("unreachable")

    def _once(self, action: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except gexc.GoogleAPICallError as exc:
            if is_rate_limited(exc.code or 0, _reasons(exc), exc.message or ""):
                raise _RateLimited(exc.message or str(exc)) from None
            self._raise_api_error(action, exc)

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
        out = []
        quota: dict[str, int] = {}
        managed = self.managed_instances()
        self._reports.drop_stale(reported, {instance_name(m) for m in managed})
        for m in managed:
            name, status = instance_name(m), instance_status(m)
            error = instance_error(m)
            removable = False
            if error is not None:
                quota[error] = quota.get(error, 0) + 1
            elif name in reported and status == "running":
                error, removable = reported[name], True
            out.append(Instance(name, status, error=error, removable=removable))
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
        size = self.target_size() + count
        check_size(size, zonal="zone" in self._where)
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
        for start in range(0, len(urls), DELETE_BATCH):
            body = {
                "instances": urls[start : start + DELETE_BATCH],
                "skip_instances_on_validation_error": True,
            }
            operation = self._call(
                "delete instances of", "delete_instances_unary", **{self._delete_field: body}
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


class ProblemReports:
    """What VMs wrote to the bucket when they could not boot or remove themselves
    (``fleet/_problems/<vm>.json``), read, said and deleted on behalf of a :class:`GceFleet`.

    Args:
        store: the bucket (None: no report is read).
        clock: when a report of a VM gone from the group is old enough to delete.
    """

    def __init__(self, store: Store | None, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.said: set[str] = set()  # VMs whose report was logged (and whose removal began)
        self._times: dict[str, float] = {}  # VM -> when its report was written

    def read(self) -> dict[str, str]:
        """VM name -> what it reported (failed boot, cannot remove itself)."""
        if self.store is None:
            return {}
        found = {}
        self._times = {}
        try:
            for key in self.store.list(PROBLEMS_PREFIX, suffix=".json"):
                record = json.loads(self.store.get(key))
                found[str(record["vm"])] = str(record["problem"])
                self._times[str(record["vm"])] = float(record.get("at", 0.0))
        except Exception as exc:  # the fleet still works without these reports
            log.warning("cannot read VM problem reports: %s", exc)
        return found

    def drop_stale(self, reported: dict[str, str], members: set[str]) -> None:
        """Delete the old reports of VMs that left the group (one that removed itself after a
        failed boot)."""
        if self.store is None:
            return
        now = self.clock.time()
        for name in set(reported) - members:
            if now - self._times.get(name, 0.0) > STALE_REPORT_SECONDS:
                try:
                    self.store.delete(f"{PROBLEMS_PREFIX}{name}.json")
                except Exception as exc:
                    log.warning("cannot delete the problem report of %s: %s", name, exc)

    def forget(self, names: set[str]) -> None:
        """Drop the problem reports of deleted VMs: a VM recreated under the name is new."""
        if self.store is None:
            return
        for name in names & self.said:
            try:
                self.store.delete(f"{PROBLEMS_PREFIX}{name}.json")
            except Exception as exc:
                log.warning("cannot delete the problem report of %s: %s", name, exc)
            self.said.discard(name)


class _RateLimited(Exception):
    """A call refused for a rate limit; retried by :meth:`GceFleet._retrying`."""


def _reasons(exc: gexc.GoogleAPICallError) -> list[str]:
    return [str(e.get("reason", "")) for e in (exc.errors or []) if isinstance(e, dict)]


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
