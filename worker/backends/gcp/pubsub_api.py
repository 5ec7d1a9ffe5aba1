"""What every Pub/Sub client of the worker shares: full resource paths, the API's limits, and
the :class:`~worker.errors.BackendError` a failed call on a topic or subscription becomes."""

from __future__ import annotations

from collections.abc import Iterator

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from worker import defaults
from worker.backends.gcp.retry import PUBSUB_RETRY
from worker.errors import BackendError, Unusable

ACK_IDS_PER_CALL = 1000  # ack ids per acknowledge / modify_ack_deadline request
PUBLISH_BYTES = 9 * 1024 * 1024  # a publish request may carry 10 MB


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
