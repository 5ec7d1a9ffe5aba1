"""The Pub/Sub event bus: workers publish progress to the events topic, the runner takes it
from the topic's subscription through an :class:`~worker.backends.gcp.pubsub_inbox.Inbox`."""

from __future__ import annotations

import logging
import threading
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1

from worker.backends.gcp.pubsub_api import resource_path
from worker.backends.gcp.pubsub_inbox import Inbox
from worker.backends.gcp.retry import PUBSUB_RETRY
from worker.protocol import Event
from worker.queue import EventBus

log = logging.getLogger("cflow.pubsub")


class PubSubEvents(EventBus):
    """Events published to a topic (workers) and taken from its subscription (the runner)."""

    def __init__(
        self,
        *,
        project: str,
        topic: str | None = None,
        subscription: str | None = None,
        subscriber: pubsub_v1.SubscriberClient | None = None,
        publisher: pubsub_v1.PublisherClient | None = None,
    ):
        self.topic = resource_path(project, "topics", topic) if topic else None
        self._publisher = publisher
        self._owns_subscriber = subscriber is None and subscription is not None
        self._subscriber = subscriber
        self._inbox: Inbox | None = None
        if subscription:
            self._subscriber = subscriber or pubsub_v1.SubscriberClient()
            self._inbox = Inbox(
                self._subscriber, resource_path(project, "subscriptions", subscription)
            )
        self._lock = threading.Lock()

    def publish(self, event: Event) -> None:
        """Queue the event for publishing and return; failures are logged (events are lossy)."""
        if self.topic is None:
            return
        with self._lock:
            if self._publisher is None:
                self._publisher = pubsub_v1.PublisherClient()
        attributes = {"kind": event.kind, "worker": event.worker}
        if event.run_id:
            attributes["run_id"] = event.run_id
        if event.shard_id:
            attributes["shard_id"] = event.shard_id
        future = self._publisher.publish(
            self.topic, event.to_json(), retry=PUBSUB_RETRY, **attributes
        )
        future.add_done_callback(_log_failure)

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        if self._inbox is None:
            return []
        events = []
        for message in self._inbox.take(max_events, timeout):
            try:
                events.append(Event.from_json(message.data))
            except (ValueError, TypeError, KeyError):
                log.warning("dropping a malformed event %s", message.message_id)
        return events

    def close(self) -> None:
        if self._inbox is not None:
            self._inbox.close()
        if self._publisher is not None:
            self._publisher.stop()  # sends what is still batched
        if self._owns_subscriber and self._subscriber is not None:
            self._subscriber.close()


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("could not publish an event: %s", exc)
