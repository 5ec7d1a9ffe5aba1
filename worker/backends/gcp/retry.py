"""One retry policy per Google service: what is worth another try, and how long to wait first.

Every call the runner and the worker make to Compute Engine, Pub/Sub and Cloud Storage goes
through the policy of its service, either by :func:`retrying` (Compute: the runner's fleet, and
through :class:`~worker.backends.gcp.retry_compute.Retried` clients its shapes and quota reads,
every page of a listing; the worker leaving its group; every call of the Cloud Storage store;
the work queue's publishes, pulls, acks and nacks; the runner's events subscription) or, for
calls made once that may give up
(administering topics and subscriptions, composing, events a worker publishes), through the
client library's own retry object built by :meth:`Policy.library_retry`.

A call through :func:`retrying` never gives up on a transient answer unless its caller bounds
it: a watch or a worker outlives a Cloud Storage or Pub/Sub outage of any length and carries on
where it was. What it waits for is said once per outage (:class:`Outage`), not once per try:
many calls wait on one outage at once.

What each service documents as worth retrying:

- Compute Engine: HTTP 5xx; rate limits, answered as 429 or as 403 ``rateLimitExceeded`` /
  ``userRateLimitExceeded``; 400 ``resourceNotReady`` (the resource is busy with another
  operation). Rate quotas are per minute and refill at the start of the next synchronized minute
  ("if a project reaches a quota limit at 10:00:15, the quota refills ... at 10:01:00",
  https://cloud.google.com/compute/docs/api-rate-limits), so a rate-limited call waits into the
  next minute, plus jitter so that a fleet refused together does not come back together.
- Pub/Sub: UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, CANCELLED and
  HTTP 502 ("the client can retry the operation",
  https://cloud.google.com/pubsub/docs/reference/error-codes), and UNKNOWN, which the client
  library's own publish retry includes.
- Cloud Storage: HTTP 408, 429 and 5xx, socket timeouts and TCP disconnects
  (https://cloud.google.com/storage/docs/retry-strategy), whether a JSON API call's error or an
  upload's or download's (the library's media calls raise ``InvalidResponse``, not an API
  error); 429 includes the one write per second to one object name, answered with exponential
  backoff as that page asks.
- All three: a reset connection or a timeout before any answer.

Anything else is permanent (403 permission, 404 not found, 400 invalid): no retry, the caller
raises one line naming the fix. Pauses are exponential with full jitter (a uniform draw between
zero and the exponential step), with an injected clock, sleep and random source.

Retrying a mutation is only safe when a repeat cannot do it twice: Compute's mutations carry a
``requestId`` kept across the retries of one call (the service ignores a repeat of a request it
already took, https://cloud.google.com/compute/docs/reference/rest/v1/instanceGroupManagers/resize),
and Cloud Storage's create-only writes carry ``ifGenerationMatch=0``.
"""

from __future__ import annotations

import http.client
import logging
import random
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import google.auth.exceptions
import google.resumable_media.common
import requests.exceptions
import urllib3.exceptions
from google.api_core import exceptions as gexc
from google.api_core import retry as gretry

from worker.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger("cflow.retry")
MediaInvalidResponse = google.resumable_media.common.InvalidResponse

T = TypeVar("T")
MINUTE = 60.0  # seconds: Compute Engine's rate quotas refill at the start of each minute
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})
NOT_READY_REASON = "resourceNotReady"  # Compute: the resource is busy with another operation
_GRPC_TRANSIENT = frozenset({"UNAVAILABLE", "INTERNAL", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})


class Kind(StrEnum):
    TRANSIENT = "transient"  # try again after a backoff
    RATE = "rate"  # a per-minute rate quota: try again in the next synchronized minute
    PERMANENT = "permanent"  # retrying cannot help; the caller says what to fix


@dataclass(frozen=True)
class Verdict:
    """What a failed call means: its kind, and the answer in words ("503", "a reset
    connection", "403 rateLimitExceeded") for the line that says what is being waited for."""

    kind: Kind
    answer: str


class HttpAnswer(Exception):
    """A Google REST API's error answer to a plain HTTP call (one made without a client
    library), judged by the same policy as the libraries' errors."""

    def __init__(self, status: int, reasons: list[str], message: str):
        super().__init__(f"HTTP {status} {message}".strip())
        self.status = status
        self.reasons = reasons
        self.message = message

    @classmethod
    def of(cls, response: Any) -> HttpAnswer:
        reasons, message = response_reasons(response)
        return cls(int(response.status_code), reasons, message or str(response.text)[:300])


class Random(Protocol):
    def uniform(self, a: float, b: float) -> float: ...


@dataclass(frozen=True)
class Policy:
    """How one service's calls are retried.

    Args:
        service: the service's name, as the user reads it ("Compute").
        first: the first backoff step (seconds).
        most: the longest backoff step (seconds).
        multiplier: how much each step grows.
        minute_quota: rate limits are per-minute quotas refilled at the synchronized minute.
        retry_codes: HTTP statuses below 500 that the service documents as worth a retry.
        retry_grpc: gRPC status names worth a retry.
        grpc: the service is called over gRPC, so an error is judged by its gRPC status.
    """

    service: str
    first: float
    most: float
    multiplier: float = 2.0
    minute_quota: bool = False
    retry_codes: frozenset[int] = field(default_factory=lambda: frozenset({429}))
    retry_grpc: frozenset[str] = field(default_factory=lambda: _GRPC_TRANSIENT)
    grpc: bool = False

    def classify(self, exc: BaseException) -> Verdict:
        """Transient, rate limit or permanent: what ``exc`` from a call of this service means."""
        if isinstance(exc, gexc.RetryError) and exc.cause is not None:
            return self.classify(exc.cause)  # the library's retries ran out on this
        if isinstance(exc, gexc.GoogleAPICallError):
            return self._classify_api(exc)
        if isinstance(exc, HttpAnswer):
            return self.classify_answer(exc.status, exc.reasons, exc.message)
        if isinstance(exc, MediaInvalidResponse):
            # Cloud Storage's uploads and downloads answer an error with this, not with an API
            # error: judged by the response it carries.
            return self.classify(HttpAnswer.of(exc.response))
        if _is_timeout(exc):
            return Verdict(Kind.TRANSIENT, "a timeout")
        if _is_connection_trouble(exc):
            return Verdict(Kind.TRANSIENT, "a reset connection")
        return Verdict(Kind.PERMANENT, type(exc).__name__)

    def classify_answer(self, status: int, reasons: list[str], message: str = "") -> Verdict:
        """The verdict on an HTTP answer: its status and the ``reason`` of each error."""
        label = f"{status} {reasons[0]}" if reasons and reasons[0] else str(status)
        if status == 429 or (status == 403 and _rate_limited(reasons, message)):
            return Verdict(Kind.RATE if self.minute_quota else Kind.TRANSIENT, label)
        if status >= 500 or status in self.retry_codes:
            return Verdict(Kind.TRANSIENT, label)
        if status == 400 and NOT_READY_REASON in reasons:
            return Verdict(Kind.TRANSIENT, label)
        return Verdict(Kind.PERMANENT, label)

    def _classify_api(self, exc: gexc.GoogleAPICallError) -> Verdict:
        grpc = getattr(exc, "grpc_status_code", None)
        if self.grpc and grpc is not None:  # a gRPC call (Pub/Sub): judged by its status name
            name = str(getattr(grpc, "name", grpc))
            return Verdict(Kind.TRANSIENT if name in self.retry_grpc else Kind.PERMANENT, name)
        return self.classify_answer(int(exc.code or 0), api_reasons(exc), exc.message or "")

    def backoff(self, attempt: int, rng: Random = random) -> float:
        """The pause before retry number ``attempt`` (0 first): full jitter, a uniform draw
        below the exponential step, so a fleet refused at once spreads its retries out."""
        step = min(self.most, self.first * self.multiplier ** min(attempt, 64))
        return rng.uniform(0.0, step)

    def delay(self, verdict: Verdict, attempt: int, now: float, rng: Random = random) -> float:
        """The pause before the next try after ``verdict``, at wall-clock time ``now``: a
        per-minute quota waits for the next synchronized minute, then a jittered step more."""
        pause = self.backoff(attempt, rng)
        if verdict.kind is Kind.RATE:
            return (MINUTE - now % MINUTE) + pause
        return pause

    def library_retry(self, timeout: float | None = None) -> gretry.Retry:
        """The client library's retry object for this policy (transient answers only, the same
        steps, full jitter, each retry logged); ``timeout`` bounds all the tries of one call."""
        return gretry.Retry(
            predicate=lambda exc: self.classify(exc).kind is not Kind.PERMANENT,
            initial=self.first,
            maximum=self.most,
            multiplier=self.multiplier,
            timeout=timeout,
            on_error=self._say_retry,
        )

    def _say_retry(self, exc: Exception) -> None:
        log.warning("%s answered %s; retrying", self.service, self.classify(exc).answer)


COMPUTE = Policy("Compute", first=1.0, most=32.0, minute_quota=True)
PUBSUB = Policy(
    "Pub/Sub",
    first=0.1,
    most=60.0,
    multiplier=1.3,
    retry_codes=frozenset({429, 499}),
    retry_grpc=_GRPC_TRANSIENT | {"ABORTED", "CANCELLED", "UNKNOWN"},
    grpc=True,
)
GCS = Policy("Cloud Storage", first=1.0, most=32.0, retry_codes=frozenset({408, 429}))
LIBRARY_TIMEOUT = 600.0  # seconds: how long a library retry keeps one Pub/Sub or GCS call going
# The retry objects of the Cloud Storage and Pub/Sub calls made once, which may give up (the
# rest go through retrying(), with no deadline).
STORAGE_RETRY = GCS.library_retry(LIBRARY_TIMEOUT)
PUBSUB_RETRY = PUBSUB.library_retry(LIBRARY_TIMEOUT)


class Outage:
    """One service failing for a while, as the calls waiting on it live it: said once when it
    starts and once when the service answers again, however many calls and tries wait
    meanwhile (a watch reads many objects a second; a line per try would drown its progress).

    Args:
        service: the service's name, as the user reads it ("Cloud Storage").
        say: where the two lines go [default: the ``cflow.retry`` log, at warning].
        clock: measures how long the outage lasted.
    """

    def __init__(
        self, service: str, say: Callable[[str], None] | None = None, clock: Clock = SYSTEM_CLOCK
    ):
        self.service = service
        self.say = say or log.warning
        self.clock = clock
        self.since: float | None = None  # clock.monotonic() of its first failed try
        self.tries = 0  # failed tries since
        self._lock = threading.Lock()

    def failed(self, verdict: Verdict, what: str) -> None:
        """A try failed with a transient answer; the first of an outage is said."""
        with self._lock:
            self.tries += 1
            first = self.since is None
            if first:
                self.since = self.clock.monotonic()
        if first:
            self.say(
                f"{self.service} answered {verdict.answer} to {what}; waiting for it to answer"
                " (retrying with backoff, no deadline)"
            )
        else:
            log.debug("%s answered %s to %s; retrying", self.service, verdict.answer, what)

    def answered(self, *, quiet: bool = False) -> None:
        """The service answered: an outage in progress is over (said unless ``quiet``)."""
        with self._lock:
            if self.since is None:
                return
            lasted, tries = self.clock.monotonic() - self.since, self.tries
            self.since, self.tries = None, 0
        if not quiet:
            self.say(f"{self.service} answers again, after {lasted:.0f} s and {tries} failed tries")


def retrying(
    policy: Policy,
    call: Callable[[], T],
    *,
    what: str,
    say: Callable[[str], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
    rng: Random = random,
    give_up_after: float | None = None,
    outage: Outage | None = None,
) -> T:
    """``call()``, retried on transient answers until it succeeds or fails for good.

    Each wait is said through ``say`` (or logged): "Compute answered 503 to resize; retrying in
    4 s"; with ``outage``, only an outage's first failed try and its end are said, through it.
    A permanent answer is raised at once, as is the last transient one when ``give_up_after``
    seconds would pass (None: never give up on a transient answer, as the runner does: a
    command ends only on a permanent error or when its user stops it).

    Args:
        what: the call in words ("resize", "list the instances").
    """
    tell = say or log.warning
    started = clock.monotonic()
    attempt = 0
    while True:
        try:
            result = call()
        except Exception as exc:
            verdict = policy.classify(exc)
            pause = policy.delay(verdict, attempt, clock.time(), rng)
            late = give_up_after is not None and clock.monotonic() - started + pause > give_up_after
            if verdict.kind is Kind.PERMANENT or late:
                if outage is not None and verdict.kind is Kind.PERMANENT:
                    outage.answered(quiet=True)  # it answered, if not what was hoped for
                raise
            if outage is not None:
                outage.failed(verdict, what)
            else:
                waits = "into the next minute's quota; " if verdict.kind is Kind.RATE else ""
                seconds = f"{pause:.0f}" if pause >= 10 else f"{pause:.1f}"
                tell(
                    f"{policy.service} answered {verdict.answer} to {what}; "
                    f"{waits}retrying in {seconds} s"
                )
            clock.sleep(pause)
            attempt += 1
        else:
            if outage is not None:
                outage.answered()
            return result


def request_id() -> str:
    """A fresh Compute ``requestId``: one per mutation, kept across its retries."""
    return str(uuid.uuid4())


def api_reasons(exc: gexc.GoogleAPICallError) -> list[str]:
    """The ``reason`` of each error a Google API error body lists."""
    reasons = [str(e.get("reason", "")) for e in (exc.errors or []) if isinstance(e, dict)]
    return [r for r in reasons if r]


def response_reasons(response: Any) -> tuple[list[str], str]:
    """The ``reason`` of each error in a Google API error response, and its message."""
    try:
        error = response.json().get("error", {})
    except ValueError:
        return [], ""
    if not isinstance(error, dict):
        return [], str(error)
    errors = error.get("errors", [])
    reasons = [str(e.get("reason", "")) for e in errors if isinstance(e, dict)]
    return [r for r in reasons if r], str(error.get("message", ""))


def _rate_limited(reasons: list[str], message: str) -> bool:
    return bool(RATE_LIMIT_REASONS.intersection(reasons)) or "rate limit" in message.lower()


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(
        exc,
        TimeoutError | requests.exceptions.Timeout | urllib3.exceptions.TimeoutError,
    )


def _is_connection_trouble(exc: BaseException) -> bool:
    return isinstance(
        exc,
        ConnectionError
        | http.client.HTTPException
        | requests.exceptions.ConnectionError
        | requests.exceptions.ChunkedEncodingError
        | urllib3.exceptions.ProtocolError
        | google.auth.exceptions.TransportError,
    )
