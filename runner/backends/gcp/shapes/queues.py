"""A work topic and subscription per machine shape, so runs of different shapes never share work.

Why a topic per shape, and not the deployment's work subscription with a filter: every worker
of every group pulls one subscription, and a shard is delivered to whichever worker asks first,
so a shard of a GPU run would run on a small CPU VM of another run (and the other way round).
A subscription filter on a ``shape`` attribute would keep them apart on the real service, but
the Pub/Sub emulator ignores filters, so nothing the tests ran would show it holds; and a filter
cannot be changed after the subscription exists, so the deployment's one subscription could not
serve shapes made later. A topic and subscription of the shape's own keeps them apart everywhere:

- the runner makes them (idempotently) when it makes the shape's group, named
  ``<work topic>-<hash>`` and ``<work subscription>-<hash>`` by the shape's hash (the group's is
  ``<group>-<hash>``), labelled ``cflow_shape=<hash>``;
- the subscription has the deployment's work subscription's settings: ack deadline, retention,
  retry policy and dead-letter policy (to the deployment's dead-letter topic, so the runner's
  dead-letter watch still sees them); and the same IAM policy, so the workers may pull it and
  Pub/Sub's service agent may dead-letter from it, with no new grant in the stack;
- the topic gets the work topic's IAM policy (workers re-publish failed shards on it);
- the shaped template's metadata names them (``cflow-subscription``, ``cflow-work-topic``), so
  the VM's worker pulls and re-queues there, and the run's shards are published there;
- they are deleted with the shape's group (:mod:`runner.backends.gcp.shapes.cleanup`); like the
per-run
  events subscriptions, the subscription also expires after ``EXPIRY`` unused.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc
from google.iam.v1 import policy_pb2

from worker.backends.gcp.pubsub import PubSubQueue
from worker.backends.gcp.pubsub_api import resource_path
from worker.backends.gcp.retry import PUBSUB, PUBSUB_RETRY, Kind
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError
from worker.protocol import WorkMessage

log = logging.getLogger("cflow.runner")

LABEL = "cflow_shape"  # label on a shape's topic and subscription; its value is the shape hash
CREATED_LABEL = "cflow_created"  # unix time it was made
MOVE_BATCH = 1000  # queued shards moved to the standard VMs' topic per watch poll, at most
MOVE_EVERY = 10.0  # seconds between the mover's pulls while it finds nothing to move
# Settings of the deployment's work subscription that a shape's subscription takes over.
COPIED = (
    "ack_deadline_seconds",
    "message_retention_duration",
    "retry_policy",
    "dead_letter_policy",
)
# A shape's subscription unused this long is deleted by Pub/Sub: 32 days, longer than any
# retention it copies (31 days at most, the deployment's), as an expiration must be.
EXPIRY = "2764800s"


@dataclass(frozen=True)
class ShapeQueue:
    """A shape's work topic and subscription (bare names, as instance metadata holds them)."""

    topic: str
    subscription: str


class ShapeQueues:
    """Make, find and delete the work topics and subscriptions of a deployment's shapes.

    Args:
        project: the deployment's project.
        work_topic: the deployment's work topic (its name or full path).
        work_subscription: the deployment's work subscription, whose settings are copied.
    """

    def __init__(
        self,
        *,
        project: str,
        work_topic: str,
        work_subscription: str,
        subscriber: pubsub_v1.SubscriberClient | None = None,
        publisher: pubsub_v1.PublisherClient | None = None,
    ) -> None:
        self.project = project
        self.work_topic = work_topic.rsplit("/", 1)[-1]
        self.work_subscription = work_subscription.rsplit("/", 1)[-1]
        self._owns = subscriber is None, publisher is None
        self.subscriber: Any = subscriber or pubsub_v1.SubscriberClient()
        self.publisher: Any = publisher or pubsub_v1.PublisherClient()

    def close(self) -> None:
        if self._owns[0]:
            self.subscriber.close()
        if self._owns[1]:
            self.publisher.transport.close()

    def names(self, digest: str) -> ShapeQueue:
        return ShapeQueue(f"{self.work_topic}-{digest}", f"{self.work_subscription}-{digest}")

    def topic_path(self, digest: str) -> str:
        return resource_path(self.project, "topics", self.names(digest).topic)

    def subscription_path(self, digest: str) -> str:
        return resource_path(self.project, "subscriptions", self.names(digest).subscription)

    def ensure(self, digest: str) -> ShapeQueue:
        """The shape's topic and subscription, made unless they exist."""
        names = self.names(digest)
        topic, sub = self.topic_path(digest), self.subscription_path(digest)
        labels = {LABEL: digest, CREATED_LABEL: str(int(time.time()))}
        try:
            self.publisher.create_topic(
                request={"name": topic, "labels": labels}, retry=PUBSUB_RETRY
            )
            log.info("created work topic %s", topic)
        except gexc.AlreadyExists:
            pass
        except gexc.GoogleAPIError as exc:
            raise _failed(f"could not create work topic {names.topic}", exc) from None
        try:
            base = self.subscriber.get_subscription(
                subscription=self._work("subscriptions"), retry=PUBSUB_RETRY
            )
        except gexc.GoogleAPIError as exc:
            raise _failed(f"cannot read work subscription {self.work_subscription}", exc) from None
        request: dict[str, Any] = {"name": sub, "topic": topic, "labels": labels}
        for name in COPIED:
            if name in base:  # proto-plus: set fields only
                request[name] = getattr(base, name)
        # Unlike the deployment's, it expires when unused (no VM pulls it): a backstop for
        # prune, as the per-run events subscriptions have. The next run of the shape makes it
        # again before it publishes anything.
        request["expiration_policy"] = {"ttl": EXPIRY}
        try:
            self.subscriber.create_subscription(request=request, retry=PUBSUB_RETRY)
            log.info("created work subscription %s", sub)
        except gexc.AlreadyExists:
            pass
        except gexc.GoogleAPIError as exc:
            what = f"could not create work subscription {names.subscription}"
            raise _failed(what, exc) from None
        # Every time, not only when made: a copy that failed once (or grants changed by a
        # redeploy) is put right by the next run of the shape.
        self._copy_policy(self.publisher, self._work("topics"), topic)
        self._copy_policy(self.subscriber, self._work("subscriptions"), sub)
        return names

    def delete(self, digest: str) -> bool:
        """Delete the shape's subscription, then its topic; whether either existed."""
        found = False
        try:
            self.subscriber.delete_subscription(
                subscription=self.subscription_path(digest), retry=PUBSUB_RETRY
            )
            found = True
        except gexc.NotFound:
            pass
        try:
            self.publisher.delete_topic(topic=self.topic_path(digest), retry=PUBSUB_RETRY)
            found = True
        except gexc.NotFound:
            pass
        return found

    def exists(self, digest: str) -> bool:
        try:
            self.subscriber.get_subscription(
                subscription=self.subscription_path(digest), retry=PUBSUB_RETRY
            )
        except gexc.NotFound:
            return False
        return True

    def _work(self, kind: str) -> str:
        name = self.work_topic if kind == "topics" else self.work_subscription
        return resource_path(self.project, kind, name)

    def _copy_policy(self, client: Any, source: str, target: str) -> None:
        """Give ``target`` the IAM policy of ``source`` (the workers' and the agent's grants).
        Both calls are safe to repeat (the bindings are set whole, with no etag), so they are
        retried on what Pub/Sub's policy takes for transient."""
        try:
            policy = client.get_iam_policy(request={"resource": source}, retry=PUBSUB_RETRY)
            if not policy.bindings:
                return
            # The bindings only: the source's etag would not match the target's policy.
            copied = policy_pb2.Policy(bindings=list(policy.bindings))
            client.set_iam_policy(
                request={"resource": target, "policy": copied}, retry=PUBSUB_RETRY
            )
        except gexc.MethodNotImplemented:  # the emulator has no IAM: nothing to copy
            log.info("no IAM policies here (an emulator); %s has none", target)
        except gexc.GoogleAPIError as exc:
            named = target.rsplit("/", 1)[-1], source.rsplit("/", 1)[-1]
            what = f"could not give {named[0]} the grants of {named[1]}"
            raise _failed(what, exc) from None


def _failed(what: str, exc: gexc.GoogleAPIError) -> BackendError:
    """One line for a call that failed for good: a role named only when the answer was
    PermissionDenied; a transient answer (the library's retries ran out on it) said as such."""
    verdict = PUBSUB.classify(exc)
    if isinstance(exc, gexc.PermissionDenied):
        return BackendError(
            f"{what} ({exc.message}); the runner's account needs roles/pubsub.admin on the project"
        )
    if verdict.kind is not Kind.PERMANENT:
        return BackendError(f"{what}: Pub/Sub kept answering {verdict.answer}; try again later")
    return BackendError(f"{what}: {verdict.answer} ({getattr(exc, 'message', exc)})")


class ShapeWorkQueue(PubSubQueue):
    """The runner's work queue for a shaped run: its shards go to the shape's topic.

    With ``--fallback standard`` every message also names the standard shape's topic and the
    run's K (``fallback_after``): a worker that gives back a shard preempted K times publishes
    it there (:meth:`worker.protocol.WorkMessage.after_preemption`), so the shard itself is
    pinned to standard VMs, whatever the fleet does.
    """

    def __init__(
        self,
        *,
        fallback_topic: str | None = None,
        fallback_after: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fallback_topic = fallback_topic
        self.fallback_after = fallback_after

    def publish(self, messages: Iterable[WorkMessage], *, delay: float = 0.0) -> int:
        if self.fallback_topic is not None:
            messages = (self._stamp(m) for m in messages)
        return super().publish(messages, delay=delay)

    def _stamp(self, message: WorkMessage) -> WorkMessage:
        if message.topic is not None or message.fallback_topic is not None:
            return message  # already routed
        return dataclasses.replace(
            message, fallback_topic=self.fallback_topic, fallback_after=self.fallback_after
        )


class Mover:
    """Moves a run's queued shards from its Spot shape's subscription to the standard shape's
    topic, once the fallback has started: standard VMs pull only their own subscription.

    Shards a Spot VM holds are leased and stay where they are (the VM finishes them or is
    preempted and gives them back, and then they move). Other runs' shards of the same shape,
    which a pull cannot avoid taking, are put back by re-publishing each unchanged on the Spot
    topic and acking the one taken. Not by a nack: Pub/Sub counts every delivery towards the
    dead-letter policy's ``max_delivery_attempts`` ("1 + the number of NACKs and of ack
    deadlines exceeded", DeadLetterPolicy in the Pub/Sub API), so a nack, or letting the lease
    run out, at every poll would dead-letter a concurrent run's healthy shards within a few
    dozen polls. A new message starts its count at zero, as a shard a worker gives back after
    a preemption does (:meth:`PubSubQueue.requeue`); published before the ack, so a failure in
    between duplicates the shard (its first commit wins) rather than losing it. Nor a
    subscription of its own filtered on the run: it would only see messages published after
    it was made, each a copy of one still queued for the Spot VMs (and the emulator the tests
    run on ignores filters).
    """

    def __init__(
        self,
        *,
        project: str,
        run_id: str,
        subscription: str,
        to_topic: str,
        subscriber: Any,
        from_topic: str | None = None,
        every: float = MOVE_EVERY,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.run_id = run_id
        self.to_topic = to_topic
        self.queue = PubSubQueue(
            project=project, topic=to_topic, subscription=subscription, subscriber=subscriber
        )
        # Where other runs' shards go back to: the Spot topic (by default, the one the
        # subscription is attached to, looked up once).
        self.back = PubSubQueue(
            project=project, topic=from_topic, subscription=subscription, subscriber=subscriber
        )
        self.moved = 0
        self.returned = 0  # other runs' shards put back (re-published on the Spot topic)
        self.every, self.clock = every, clock
        self._idle_until = 0.0

    def __call__(self, max_messages: int = MOVE_BATCH) -> int:
        """Move what is queued now (one pull); how many shards moved.

        An empty pull may take the service seconds to answer, and the watch loop calls this at
        every poll: after a pull that found nothing of the run's, the next one waits ``every``
        seconds (so other runs' shards are put back at most that often).
        """
        if self.clock.monotonic() < self._idle_until:
            return 0
        moved = 0
        for delivery in self.queue.receive(max_messages, 0.0):
            message = delivery.message
            if message.run_id != self.run_id:
                self.back.publish([message])  # published anew first, then acked
                self.queue.ack(delivery)
                self.returned += 1
                continue
            routed = dataclasses.replace(message, topic=self.to_topic, fallback_topic=None)
            self.queue.requeue(delivery, routed)  # published first, then acked
            moved += 1
        if moved:
            log.info("moved %d queued shards of run %s to standard VMs", moved, self.run_id)
        else:
            self._idle_until = self.clock.monotonic() + self.every
        self.moved += moved
        return moved

    def close(self) -> None:
        self.queue.close()
        self.back.close()
