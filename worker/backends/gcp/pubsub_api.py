"""What every Pub/Sub client of the worker shares: full resource paths, the API's limits, the
:class:`~worker.errors.BackendError` a failed call on a topic or subscription becomes, and
publishing that waits out an outage."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from worker import defaults
from worker.backends.gcp.retry import PUBSUB, PUBSUB_RETRY, Kind, Outage, retrying
from worker.clock import Clock
from worker.errors import BackendError, Unusable

ACK_IDS_PER_CALL = 1000  # ack ids per acknowledge / modify_ack_deadline request
PUBLISH_BYTES = 9 * 1024 * 1024  # a publish request may carry 10 MB
PUBLISH_TIMEOUT = 120.0  # seconds to wait for one batch of publishes to be stored
# (topic, data, attributes): one message to publish
Outgoing = tuple[str, bytes, Mapping[str, str]]


def batching_publisher() -> pubsub_v1.PublisherClient:
    """A publisher that sends up to ``defaults.PUBLISH_BATCH`` messages a request."""
    return pubsub_v1.PublisherClient(
        batch_settings=pubsub_v1.types.BatchSettings(
            max_messages=defaults.PUBLISH_BATCH, max_bytes=PUBLISH_BYTES, max_latency=0.05
        )
    )


def per_call(ack_ids: list[str]) -> Iterator[list[str]]:
    """Ack ids in requests of at most ``ACK_IDS_PER_CALL``."""
    for start in range(0, len(ack_ids), ACK_IDS_PER_CALL):
        yield ack_ids[start : start + ACK_IDS_PER_CALL]


def each_request(
    call: Callable[[list[str]], object],
    ack_ids: list[str],
    *,
    what: str,
    clock: Clock,
    outage: Outage,
    give_up_after: float | None = None,
) -> None:
    """``call(chunk)`` (an acknowledge or modify_ack_deadline with ``retry=None``) for each
    request's worth of ``ack_ids``, through Pub/Sub's policy: retried on transient answers with
    no deadline unless ``give_up_after`` seconds, the outage said once."""
    for chunk in per_call(ack_ids):
        retrying(
            PUBSUB,
            functools.partial(call, chunk),
            what=what,
            clock=clock,
            give_up_after=give_up_after,
            outage=outage,
        )


def resource_path(project: str, kind: str, name: str) -> str:
    """``projects/P/<kind>/NAME`` from a bare name, or the full path unchanged."""
    if name.startswith("projects/"):
        return name
    return f"projects/{project}/{kind}/{name}"


def not_found_or_denied(exc: BaseException, what: str) -> BackendError:
    """The error to raise for ``exc`` from a call on ``what`` (a topic or subscription): a
    missing resource or a missing permission say what to check."""
    if isinstance(exc, gexc.NotFound):
        return Unusable(f"{what} does not exist; check the deployment (`runner doctor`)")
    if isinstance(exc, gexc.PermissionDenied | gexc.Forbidden | gexc.Unauthenticated):
        return Unusable(f"no permission to use {what}; check the credentials' roles")
    return BackendError(f"{what}: {exc}")


def subscription_topic(subscriber: pubsub_v1.SubscriberClient, subscription: str) -> str:
    """The topic ``subscription`` receives from; BackendError (naming the worker's flag) when
    it cannot be read."""
    try:
        sub = subscriber.get_subscription(subscription=subscription, retry=PUBSUB_RETRY)
    except gexc.GoogleAPICallError as exc:
        raise BackendError(
            f"cannot find the work topic of {subscription} ({exc.message}); "
            "give the worker --work-topic (CFLOW_WORK_TOPIC)"
        ) from None
    return str(sub.topic)


def publish_stored(
    publisher: pubsub_v1.PublisherClient,
    messages: Sequence[Outgoing],
    *,
    clock: Clock,
    outage: Outage,
) -> None:
    """Publish ``messages`` and return once Pub/Sub has stored every one.

    The library's retry is off: a message refused with a transient answer (or not answered in
    ``PUBLISH_TIMEOUT``) is published again through Pub/Sub's policy, with no deadline, and
    the outage said once; a duplicate is harmless (the first commit of a shard wins).

    Raises:
        BackendError: a topic is missing or forbidden (a permanent answer).
    """
    pending = list(messages)

    def once() -> None:
        nonlocal pending
        sent: list[tuple[Outgoing, Future[Any]]] = [
            (m, publisher.publish(m[0], m[1], retry=None, **m[2])) for m in pending
        ]
        failed, first = [], None
        for message, future in sent:
            try:
                future.result(timeout=PUBLISH_TIMEOUT)
            except Exception as exc:
                if PUBSUB.classify(exc).kind is Kind.PERMANENT:
                    raise not_found_or_denied(exc, f"work topic {message[0]}") from None
                failed.append(message)
                first = first or exc
        pending = failed
        if first is not None:
            raise first

    topics = sorted({m[0] for m in messages})
    what = f"publish {len(messages)} messages to {', '.join(topics)}"
    retrying(PUBSUB, once, what=what, clock=clock, outage=outage)
