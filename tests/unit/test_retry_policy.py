"""The retry policy of each Google service: what is retried, how long it waits, when it stops."""

from __future__ import annotations

import http.client
import random

import pytest
import requests
from google.api_core import exceptions as gexc

from worker.backends.gcp.retry import (
    COMPUTE,
    GCS,
    MINUTE,
    PUBSUB,
    HttpAnswer,
    Kind,
    Outage,
    Policy,
    retrying,
)
from worker.clock import FakeClock


def _api(code: int, reason: str = "", message: str = "m") -> gexc.GoogleAPICallError:
    errors = [{"reason": reason, "message": message}] if reason else []
    return gexc.from_http_status(code, message, errors=errors)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_api(500), Kind.TRANSIENT),
        (_api(502), Kind.TRANSIENT),
        (_api(503, "backendError"), Kind.TRANSIENT),
        (_api(504), Kind.TRANSIENT),
        (_api(429), Kind.RATE),
        (_api(403, "rateLimitExceeded", "Rate Limit Exceeded"), Kind.RATE),
        (_api(403, "userRateLimitExceeded"), Kind.RATE),
        (_api(400, "resourceNotReady", "The resource is not ready"), Kind.TRANSIENT),
        (_api(403, "forbidden", "Required 'compute.instanceGroupManagers.update'"), Kind.PERMANENT),
        (_api(404, "notFound"), Kind.PERMANENT),
        (_api(400, "invalid"), Kind.PERMANENT),
        (_api(409, "alreadyExists"), Kind.PERMANENT),
        (requests.exceptions.ConnectionError("Connection aborted."), Kind.TRANSIENT),
        (requests.exceptions.ReadTimeout("read timed out"), Kind.TRANSIENT),
        (ConnectionResetError(104, "Connection reset by peer"), Kind.TRANSIENT),
        (http.client.RemoteDisconnected("closed"), Kind.TRANSIENT),
        (gexc.RetryError("gave up", _api(503)), Kind.TRANSIENT),
        (ValueError("a bug"), Kind.PERMANENT),
    ],
)
def test_compute_classification(exc: Exception, kind: Kind) -> None:
    assert COMPUTE.classify(exc).kind is kind


def test_a_plain_http_answer_is_judged_like_a_library_error() -> None:
    assert COMPUTE.classify(HttpAnswer(400, ["resourceNotReady"], "busy")).kind is Kind.TRANSIENT
    assert COMPUTE.classify(HttpAnswer(403, [], "Required permission")).kind is Kind.PERMANENT
    verdict = COMPUTE.classify(HttpAnswer(503, [], "unavailable"))
    assert verdict.kind is Kind.TRANSIENT and verdict.answer == "503"


def test_pubsub_is_judged_by_its_grpc_status() -> None:
    for exc in (
        gexc.ServiceUnavailable("x"),
        gexc.DeadlineExceeded("x"),
        gexc.ResourceExhausted("x"),
        gexc.InternalServerError("x"),
        gexc.Aborted("x"),
        gexc.Unknown("x"),
    ):
        assert PUBSUB.classify(exc).kind is Kind.TRANSIENT, exc
    for exc in (
        gexc.NotFound("x"),
        gexc.PermissionDenied("x"),
        gexc.AlreadyExists("x"),
        gexc.InvalidArgument("x"),
        gexc.FailedPrecondition("x"),
    ):
        assert PUBSUB.classify(exc).kind is Kind.PERMANENT, exc
    assert PUBSUB.classify(gexc.ServiceUnavailable("x")).answer == "UNAVAILABLE"
    # Pub/Sub's quota refusals are not Compute's per-minute buckets: plain backoff.
    assert PUBSUB.classify(gexc.ResourceExhausted("x")).kind is Kind.TRANSIENT


def test_cloud_storage_retries_408_429_and_5xx_only() -> None:
    assert GCS.classify(_api(408)).kind is Kind.TRANSIENT
    assert GCS.classify(_api(429)).kind is Kind.TRANSIENT  # no per-minute window to wait for
    assert GCS.classify(_api(503)).kind is Kind.TRANSIENT
    assert GCS.classify(_api(412)).kind is Kind.PERMANENT  # a precondition: the caller decides
    assert GCS.classify(_api(403)).kind is Kind.PERMANENT
    assert COMPUTE.classify(_api(408)).kind is Kind.PERMANENT


def test_backoff_is_full_jitter_below_a_growing_capped_step() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        step = min(COMPUTE.most, COMPUTE.first * 2**attempt)
        draws = [COMPUTE.backoff(attempt, rng) for _ in range(200)]
        assert all(0.0 <= d <= step for d in draws)
        assert max(draws) > 0.8 * step and min(draws) < 0.2 * step  # spread over the whole step


def test_a_rate_limit_waits_into_the_next_synchronized_minute() -> None:
    rng = random.Random(1)
    rate = COMPUTE.classify(_api(403, "rateLimitExceeded"))
    for now in (1_700_000_015.0, 1_700_000_059.5, 1_700_000_040.25):
        for attempt in range(6):
            pause = COMPUTE.delay(rate, attempt, now, rng)
            start = now + pause
            into = start % MINUTE
            # It resumes in a later minute, within the jitter step of that minute's start.
            assert start // MINUTE > now // MINUTE
            assert into <= min(COMPUTE.most, COMPUTE.first * 2**attempt)
    transient = COMPUTE.classify(_api(503))
    assert COMPUTE.delay(transient, 0, 1_700_000_015.0, rng) <= COMPUTE.first


def test_two_thousand_workers_refused_together_do_not_return_together() -> None:
    rate = COMPUTE.classify(_api(429))
    rng = random.Random(3)
    starts = [1_700_000_015.0 + COMPUTE.delay(rate, 3, 1_700_000_015.0, rng) for _ in range(2000)]
    per_second: dict[int, int] = {}
    for s in starts:
        per_second[int(s)] = per_second.get(int(s), 0) + 1
    assert max(per_second.values()) < 2000 / 4  # spread over the step, not one instant


def test_retrying_says_what_it_waits_for_and_goes_on_until_it_succeeds() -> None:
    clock = FakeClock(start=1_700_000_010.0)
    answers: list[Exception | None] = [
        _api(503),
        requests.exceptions.ConnectionError("reset"),
        _api(403, "rateLimitExceeded", "Rate Limit Exceeded"),
        None,
    ]
    said: list[str] = []

    def call() -> str:
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return "done"

    started = clock.time()
    assert retrying(COMPUTE, call, what="resize", say=said.append, clock=clock) == "done"
    assert said[0].startswith("Compute answered 503 to resize; retrying in ")
    assert "a reset connection" in said[1]
    assert "403 rateLimitExceeded" in said[2] and "next minute" in said[2]
    assert clock.time() // MINUTE > started // MINUTE  # it waited into the next minute


def test_a_permanent_answer_ends_at_once_and_a_give_up_bound_holds() -> None:
    clock = FakeClock()
    slept: list[float] = []

    def refused() -> None:
        raise _api(403, "forbidden", "Required 'compute.instanceGroupManagers.update'")

    with pytest.raises(gexc.Forbidden):
        retrying(COMPUTE, refused, what="resize", say=slept.append, clock=clock)
    assert slept == []

    def down() -> None:
        raise _api(503)

    with pytest.raises(gexc.ServiceUnavailable):
        retrying(COMPUTE, down, what="resize", say=slept.append, clock=clock, give_up_after=300)
    assert 300 >= clock.monotonic() - 1_700_000_000.0 > 0 and len(slept) > 3


def test_the_library_retry_follows_the_policy() -> None:
    policy = Policy("Test", first=0.01, most=0.02)
    retry = policy.library_retry(timeout=5.0)
    assert retry._predicate(_api(503)) and retry._predicate(requests.exceptions.ConnectionError())
    assert not retry._predicate(_api(404))
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise _api(503)
        return "ok"

    assert retry(flaky)() == "ok" and len(calls) == 3


def test_an_outage_is_said_once_however_many_calls_and_tries_wait_on_it() -> None:
    clock = FakeClock()
    said: list[str] = []
    outage = Outage("Cloud Storage", said.append, clock)
    down_until = clock.monotonic() + 3600.0  # an hour: six times the libraries' deadline

    def read() -> bytes:
        if clock.monotonic() < down_until:
            raise _api(503, "backendError")
        return b"ok"

    for key in ("a", "b", "c"):  # a watch's reads, one after another, all in the one outage
        assert retrying(GCS, read, what=f"read {key}", clock=clock, outage=outage) == b"ok"
    assert clock.monotonic() >= down_until
    assert said == [
        "Cloud Storage answered 503 backendError to read a; waiting for it to answer"
        " (retrying with backoff, no deadline)",
        said[1],
    ]
    assert said[1].startswith("Cloud Storage answers again, after 3")
    # A permanent answer ends the call at once, and a later outage is said again.
    with pytest.raises(gexc.NotFound):
        retrying(GCS, lambda: (_ for _ in ()).throw(_api(404)), what="read d", outage=outage)
    down_until = clock.monotonic() + 60.0
    assert retrying(GCS, read, what="read e", clock=clock, outage=outage) == b"ok"
    assert len(said) == 4 and "to read e" in said[2]
