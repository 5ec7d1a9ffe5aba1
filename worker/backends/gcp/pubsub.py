"""The Pub/Sub work queue: shards on the work topic, received from its subscription.

Workers **receive** with a synchronous pull of at most their free slots, so no worker holds work
another idle VM could take. Every pull gives the server at least ``PULL_DEADLINE`` to answer,
however short the caller's timeout: when a client gives up on a pull first, the messages the
server had already handed to it stay leased until their ack deadline and count as a delivery
(python-pubsub #1414 and #440, google-cloud-python #8087), so a short client deadline strands
work and burns delivery attempts while a worker is merely idle. The server answers a pull that
finds messages at once and may hold an empty one up to the deadline, so an idle worker's receive
can take up to ``PULL_DEADLINE``: the price of never abandoning a pull in flight.
(Streaming pull's flow control would do the same on the real service, but the emulator ignores
``max_outstanding_messages`` and streams the whole backlog to the first subscriber; the unary pull
behaves the same everywhere.)
A lease is the message's ack deadline: set when the message arrives and extended in one batched
call per period by a background **leaser** (:mod:`worker.backends.gcp.pubsub_leases`), for as
long as the message is held but at most ``max_lease_seconds`` (beyond that only the agent's
:meth:`PubSubQueue.extend` calls keep it).
**ack** is ``acknowledge`` after commit; **nack** is ``modify_ack_deadline 0``, which redelivers
at once. Publishes, acks, nacks and lease renewals go through Pub/Sub's retry policy with no
deadline (an outage is waited out, and said once); only giving messages back while the queue
closes gives up, after ``CLOSE_SECONDS``.

The runner takes dead letters through a streaming pull
(:class:`~worker.backends.gcp.pubsub_inbox.Inbox`); progress events travel on the event bus
(:mod:`worker.backends.gcp.pubsub_events`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from worker import defaults
from worker.backends.gcp.pubsub_api import (
    batching_publisher,
    each_request,
    not_found_or_denied,
    publish_stored,
    resource_path,
    subscription_topic,
)
from worker.backends.gcp.pubsub_inbox import Inbox
from worker.backends.gcp.pubsub_leases import Lease, Leases
from worker.backends.gcp.retry import PUBSUB, Kind, Outage
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError
from worker.protocol import WorkMessage
from worker.queue import Delivery, WorkQueue

log = logging.getLogger("cflow.pubsub")

MIN_ACK_DEADLINE = 10  # seconds: Pub/Sub's bounds for an ack deadline
MAX_ACK_DEADLINE = 600
MAX_LEASE_SECONDS = 6 * 3600.0  # longest the leaser keeps a message without agent heartbeats
CLOSE_SECONDS = 10.0  # seconds closing tries to give held messages back (a preempted VM has 30)
PULL_DEADLINE = 5.0  # seconds a pull may take: one that finds messages is answered in milliseconds
_PULL_BACKOFF = (0.02, 0.25)  # seconds: first and longest pause between empty pulls


class PubSubQueue(WorkQueue):
    """Shard messages on a Pub/Sub topic, received from its subscription.

    Args:
        project: the project of bare topic and subscription names.
        topic: the work topic (for :meth:`publish`); looked up from ``subscription`` if absent.
        subscription: the work subscription (for :meth:`receive`).
        dead_letter_subscription: where messages that kept killing workers end up.
        lease_seconds: the ack deadline the leaser keeps renewing.
        max_lease_seconds: how long the leaser renews a held message by itself.
    """

    holds_empty_receives = True

    def __init__(
        self,
        *,
        project: str,
        topic: str | None = None,
        subscription: str | None = None,
        dead_letter_subscription: str | None = None,
        lease_seconds: float = defaults.LEASE_SECONDS,
        max_lease_seconds: float | None = None,
        subscriber: pubsub_v1.SubscriberClient | None = None,
        publisher: pubsub_v1.PublisherClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.project = project
        self.topic = resource_path(project, "topics", topic) if topic else None
        self.subscription = (
            resource_path(project, "subscriptions", subscription) if subscription else None
        )
        self.lease_seconds = int(min(max(lease_seconds, MIN_ACK_DEADLINE), MAX_ACK_DEADLINE))
        self.max_lease_seconds = max_lease_seconds or MAX_LEASE_SECONDS
        self.clock = clock
        self.outage = Outage("Pub/Sub", clock=clock)  # said once however many calls wait
        self.before_publish: Callable[[], None] | None = None  # e.g. wait for staged inputs
        self._owns_subscriber = subscriber is None
        self._subscriber = subscriber
        if subscriber is None and (subscription or dead_letter_subscription):
            self._subscriber = pubsub_v1.SubscriberClient()  # shared by every slot's thread
        self._publisher = publisher
        self._lock = threading.Lock()
        self._leases = Leases(
            self._modify,
            lease_seconds=self.lease_seconds,
            max_lease_seconds=self.max_lease_seconds,
            clock=clock,
        )
        self._dead = (
            Inbox(
                self.subscriber,
                resource_path(project, "subscriptions", dead_letter_subscription),
            )
            if dead_letter_subscription
            else None
        )

    @property
    def subscriber(self) -> pubsub_v1.SubscriberClient:
        if self._subscriber is None:
            self._subscriber = pubsub_v1.SubscriberClient()
        return self._subscriber

    @property
    def publisher(self) -> pubsub_v1.PublisherClient:
        with self._lock:
            if self._publisher is None:
                self._publisher = batching_publisher()
            return self._publisher

    # -- publishing ----------------------------------------------------------------------

    def publish(self, messages: Iterable[WorkMessage], *, delay: float = 0.0) -> int:
        """Publish in batches, waiting for each batch to be stored. Pub/Sub has no delayed
        delivery, so ``delay`` is ignored. A message that names its own ``topic`` (a shard
        moved to another machine shape's queue) goes there; the rest to the queue's topic."""
        topic = self._work_topic()
        if self.before_publish is not None:
            self.before_publish()
        count = 0
        it = iter(messages)
        while batch := list(islice(it, defaults.PUBLISH_BATCH)):
            sent = [(self._topic_of(m, topic), m.to_json(), m.attributes()) for m in batch]
            publish_stored(self.publisher, sent, clock=self.clock, outage=self.outage)
            count += len(batch)
        return count

    def _topic_of(self, message: WorkMessage, default: str) -> str:
        return resource_path(self.project, "topics", message.topic) if message.topic else default

    def _work_topic(self) -> str:
        if self.topic is None:
            if self.subscription is None:
                raise BackendError("this queue has no work topic to publish to")
            self.topic = subscription_topic(self.subscriber, self.subscription)
        return self.topic

    # -- receiving -----------------------------------------------------------------------

    def receive(
        self, max_messages: int, timeout: float, *, worker: str | None = None
    ) -> list[Delivery]:
        if self.subscription is None:
            raise BackendError("this queue has no work subscription to receive from")
        if max_messages < 1:
            return []
        deadline = self.clock.monotonic() + timeout
        pause = _PULL_BACKOFF[0]
        while True:
            received = self._pull(max_messages, max(timeout, PULL_DEADLINE))
            if received and self._leases.closed.is_set():
                # Closed while the pull was out: the messages go back at once.
                self._modify([r.ack_id for r in received], 0, give_up_after=CLOSE_SECONDS)
                return []
            if received:
                return self._lease_all(received)
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return []
            # An empty pull may be answered at once (the service, under some loads) or held
            # (the emulator holds one about 4 s): pause before the next.
            self.clock.sleep(min(pause, remaining))
            pause = min(pause * 2, _PULL_BACKOFF[1])

    def _pull(self, max_messages: int, timeout: float) -> list[Any]:
        assert self.subscription is not None
        try:
            response = self.subscriber.pull(
                request={"subscription": self.subscription, "max_messages": max_messages},
                timeout=timeout,
                retry=None,
            )
        except gexc.GoogleAPIError as exc:
            # Pub/Sub's policy judges it; a transient answer is an empty pull, and the
            # receive loop (or the agent's next receive) pulls again after its pause.
            verdict = PUBSUB.classify(exc)
            if verdict.kind is Kind.PERMANENT:
                raise not_found_or_denied(exc, f"work subscription {self.subscription}") from None
            if not isinstance(exc, gexc.DeadlineExceeded):  # an empty pull held to its end
                self.outage.failed(verdict, f"pull from {self.subscription}")
            return []
        self.outage.answered()
        return list(response.received_messages)

    def _lease_all(self, received: Sequence[Any]) -> list[Delivery]:
        ack_ids = [r.ack_id for r in received]
        # Set our own deadline at once: the subscription's may be shorter than a leaser period.
        try:
            self._modify(ack_ids, self.lease_seconds)
        except gexc.GoogleAPICallError as exc:  # the leaser tries again within a period
            log.warning("could not lease %d received messages: %s", len(ack_ids), exc)
        out = []
        for r, lease in zip(received, self._leases.hold(ack_ids), strict=True):
            try:
                message = WorkMessage.from_json(r.message.data)
            except (ValueError, TypeError, KeyError):
                log.error("dropping a malformed work message %s", r.message.message_id)
                self._leases.drop(lease)
                self._acknowledge([r.ack_id])
                continue
            # delivery_attempt is 0 when the subscription has no dead-letter policy.
            out.append(Delivery(message, max(r.delivery_attempt, 1), lease))
        return out

    def ack(self, delivery: Delivery) -> None:
        lease: Lease = delivery.handle
        self._leases.drop(lease)
        self._acknowledge([lease.ack_id])

    def nack(self, delivery: Delivery, *, delay: float = 0.0) -> None:
        lease: Lease = delivery.handle
        self._leases.drop(lease)
        # An ack deadline of N seconds is a redelivery after N (at most 600, Pub/Sub's limit).
        self._modify([lease.ack_id], int(min(max(delay, 0), 600)))

    def requeue(self, delivery: Delivery, message: WorkMessage, *, front: bool = False) -> None:
        """Replace the leased message with ``message``, so its delivery count starts over.

        Published first and acked after: a crash in between duplicates the shard (the first
        commit wins) instead of losing it. Pub/Sub has no front of the queue; ``front`` is a hint.
        """
        self.publish([message])
        self.ack(delivery)

    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Ask the leaser to keep the message ``seconds`` more, even past ``max_lease_seconds``.

        No call of its own: the leaser renews every held message in one batched call.
        """
        self._leases.extend(delivery.handle, seconds)

    def _acknowledge(self, ack_ids: list[str]) -> None:
        sub = self.subscription
        each_request(
            lambda chunk: self.subscriber.acknowledge(subscription=sub, ack_ids=chunk, retry=None),
            ack_ids,
            what=f"acknowledge on {sub}",
            clock=self.clock,
            outage=self.outage,
        )

    def _modify(
        self, ack_ids: list[str], seconds: int, *, give_up_after: float | None = None
    ) -> None:
        sub = self.subscription
        each_request(
            lambda chunk: self.subscriber.modify_ack_deadline(
                subscription=sub, ack_ids=chunk, ack_deadline_seconds=seconds, retry=None
            ),
            ack_ids,
            what=f"modify ack deadlines on {sub}",
            clock=self.clock,
            outage=self.outage,
            give_up_after=give_up_after,
        )

    # -- the runner's side ---------------------------------------------------------------

    def dead_letters(self, max_messages: int = 100) -> list[WorkMessage]:
        if self._dead is None:
            return []
        out = []
        for message in self._dead.take(max_messages, 0.0):
            try:
                out.append(WorkMessage.from_json(message.data))
            except (ValueError, TypeError, KeyError):
                log.error("dropping a malformed dead letter %s", message.message_id)
        return out

    def close(self) -> None:
        held = self._leases.close()
        if held:  # the agent settles every delivery; anything left goes back at once
            try:
                self._modify(held, 0, give_up_after=CLOSE_SECONDS)
            except Exception:
                log.warning("could not return %d held messages", len(held), exc_info=True)
        if self._dead is not None:
            self._dead.close()
        if self._publisher is not None:
            self._publisher.stop()
        if self._owns_subscriber and self._subscriber is not None:
            self._subscriber.close()
