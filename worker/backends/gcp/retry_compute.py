"""Compute Engine's calls through its retry policy: clients whose every call (and every page
of a listing) is retried, and mutations whose operations are waited on to their end.

The policy itself, what is transient and how long to wait, is
:data:`worker.backends.gcp.retry.COMPUTE`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from worker import defaults
from worker.backends.gcp.retry import (
    COMPUTE,
    NOT_READY_REASON,
    HttpAnswer,
    Policy,
    request_id,
    retrying,
)
from worker.clock import SYSTEM_CLOCK, Clock

T = TypeVar("T")


class Retried:
    """A Google client library client whose every method call goes through ``policy``
    (:func:`retrying`, the library's own retry turned off). A mutation (``insert``,
    ``delete``, ``resize``, ...) given a ``request`` dict without a ``request_id`` gets one,
    the same in each of its retries. A listing answers with the items of every page, each page
    asked for through the policy too. Anything else (``transport``) is the client's own."""

    MUTATIONS = ("insert", "delete", "resize", "patch", "update", "set_", "abandon")

    def __init__(
        self,
        client: Any,
        policy: Policy,
        *,
        say: Callable[[str], None] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self._client = client
        self._policy = policy
        self._say = say
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._client, name)
        if not callable(found) or name.startswith("_"):
            return found

        what = f"{name} ({type(self._client).__name__.removesuffix('Client')})"

        def call(*args: Any, **kwargs: Any) -> Any:
            request = kwargs.get("request")
            if name.startswith(self.MUTATIONS) and isinstance(request, dict):
                kwargs["request"] = {"request_id": request_id(), **request}
            answer = self._retried(lambda: found(*args, retry=None, **kwargs), what)
            if hasattr(answer, "pages") and isinstance(request, dict):  # a listing's pager
                return self._every_page(answer, found, args, kwargs, what)
            return answer

        return call

    def _retried(self, call: Callable[[], T], what: str) -> T:
        return retrying(self._policy, call, what=what, say=self._say, clock=self._clock)

    def _every_page(
        self, pager: Any, method: Any, args: Any, kwargs: dict[str, Any], what: str
    ) -> Iterator[Any]:
        """The items of every page of a listing, each page after the first asked for through
        the policy too (the library's pager would ask for them with no retry at all): the
        request again with the last page's ``page_token``."""
        while True:
            page = next(iter(pager.pages))  # the answer in hand: no call
            token = page.next_page_token
            page.next_page_token = ""  # so that iterating the pager stays on this page
            yield from pager
            if not token:
                return
            pager = self._retried(_page_call(method, args, kwargs, token), what)


OPERATION_TIMEOUT = defaults.COMPUTE_OPERATION_SECONDS


class OperationStillRunning(Exception):
    """A Compute operation that had not ended when its wait gave up."""


def operation_answer(operation: Any) -> HttpAnswer | None:
    """A finished Compute operation's error as an :class:`HttpAnswer` (None: it succeeded).
    The operation's ``RESOURCE_NOT_READY`` is the API's ``resourceNotReady``."""
    errors = list(operation.error.errors) if operation.error else []
    if not errors:
        return None
    codes = [NOT_READY_REASON if e.code == "RESOURCE_NOT_READY" else str(e.code) for e in errors]
    message = "; ".join(f"{e.code}: {e.message}" for e in errors)
    return HttpAnswer(int(operation.http_error_status_code or 400), codes, message)


def run_operation(
    start: Callable[[], Any],
    wait: Callable[[Any], Any],
    *,
    what: str,
    say: Callable[[str], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    timeout: float = OPERATION_TIMEOUT,
) -> Any:
    """Start a Compute mutation and wait for its operation to end, all through Compute's policy.

    The client library's own ``ExtendedOperation.result()`` polls at compute.googleapis.com,
    whatever endpoint its client was given, and without this policy; so operations are waited
    on here, by the caller's operations client. ``start()`` makes the mutation (a ``*_unary``
    call of a :class:`Retried` client: one ``requestId`` across its retries) and returns its
    operation; ``wait(operation)`` is that operations client's ``wait`` on it, which may answer
    before the operation is done ("be prepared to retry if the operation is not DONE",
    https://cloud.google.com/compute/docs/reference/rest/v1/zoneOperations/wait). An operation
    that ends in an error the policy takes for transient (500, ``RESOURCE_NOT_READY``: the
    mutation did not happen) is started again after a backoff, with a fresh ``requestId``.

    Raises:
        HttpAnswer: the operation ended in a permanent error.
        OperationStillRunning: it had not ended after ``timeout`` seconds.
    """

    def once() -> Any:
        operation = start()
        deadline = clock.monotonic() + timeout
        while str(getattr(operation.status, "name", operation.status)) != "DONE":
            if clock.monotonic() >= deadline:
                raise OperationStillRunning(f"{what} is still running after {timeout:.0f} s")
            operation = wait(operation)
        failure = operation_answer(operation)
        if failure is not None:
            raise failure
        return operation

    return retrying(COMPUTE, once, what=what, say=say, clock=clock)


def _page_call(method: Any, args: Any, kwargs: dict[str, Any], token: str) -> Callable[[], Any]:
    """The call that asks for the page after ``token`` of a listing."""
    request = {**kwargs["request"], "page_token": token}
    return lambda: method(*args, retry=None, **{**kwargs, "request": request})
