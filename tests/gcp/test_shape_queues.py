"""A work topic and subscription per machine shape, on the Pub/Sub emulator: made like the
deployment's, and the routes a shard takes between a shape's Spot and standard queues."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runner.backends.gcp.shapes.queues import LABEL, Mover, ShapeQueues, ShapeWorkQueue
from tests.emulators import Deployment
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.backends.gcp.pubsub import PubSubQueue
from worker.backends.gcp.pubsub_events import PubSubEvents
from worker.ledger import Finished, Ledger, settle_one
from worker.protocol import AttemptState, Shard, WorkMessage
from worker.queue import Delivery

pytestmark = pytest.mark.emulator

SPOT, STANDARD = "aaaa1111", "bbbb2222"


@pytest.fixture
def queues(deployment: Deployment) -> Iterator[ShapeQueues]:
    q = ShapeQueues(
        project=deployment.project,
        work_topic=deployment.work_topic,
        work_subscription=deployment.work_subscription,
    )
    yield q
    q.close()


def _queue(d: Deployment, queues: ShapeQueues, digest: str) -> PubSubQueue:
    names = queues.names(digest)
    return PubSubQueue(project=d.project, topic=names.topic, subscription=names.subscription)


def _take(queue: PubSubQueue, timeout: float = 3.0) -> Delivery | None:
    got = queue.receive(1, timeout)
    return got[0] if got else None


def test_a_shape_queue_has_the_work_subscriptions_settings(
    deployment: Deployment, queues: ShapeQueues
) -> None:
    made = queues.ensure(SPOT)
    assert made.topic == f"{deployment.work_topic}-{SPOT}"
    assert made.subscription == f"{deployment.work_subscription}-{SPOT}"
    assert queues.ensure(SPOT) == made  # idempotent
    base = queues.subscriber.get_subscription(
        subscription=f"projects/{deployment.project}/subscriptions/{deployment.work_subscription}"
    )
    sub = queues.subscriber.get_subscription(subscription=queues.subscription_path(SPOT))
    assert sub.topic == queues.topic_path(SPOT)
    assert sub.ack_deadline_seconds == base.ack_deadline_seconds
    assert sub.dead_letter_policy == base.dead_letter_policy  # the deployment's dead letters
    assert sub.dead_letter_policy.dead_letter_topic.endswith(deployment.dead_letter_topic)
    assert sub.labels[LABEL] == SPOT
    assert sub.expiration_policy.ttl.total_seconds() == 32 * 86400  # unused, it goes by itself,
    assert sub.expiration_policy.ttl > sub.message_retention_duration  # after its messages
    topic = queues.publisher.get_topic(topic=queues.topic_path(SPOT))
    assert topic.labels[LABEL] == SPOT
    assert queues.delete(SPOT) and not queues.exists(SPOT)
    assert not queues.delete(SPOT)  # gone already


def test_a_shard_preempted_k_times_moves_to_the_standard_shape_and_stays_there(
    deployment: Deployment, queues: ShapeQueues
) -> None:
    spot, standard = queues.ensure(SPOT), queues.ensure(STANDARD)
    runner = ShapeWorkQueue(
        project=deployment.project,
        topic=spot.topic,
        fallback_topic=standard.topic,
        fallback_after=2,
    )
    runner.publish([WorkMessage("r1", Shard("s1", 0).to_dict())])
    runner.close()
    spot_q, standard_q = _queue(deployment, queues, SPOT), _queue(deployment, queues, STANDARD)
    store = GcsStore(deployment.bucket, client=make_client(deployment.project))
    events = PubSubEvents(project=deployment.project, topic=deployment.events_topic)

    def settle(queue: PubSubQueue, delivery: Delivery, state: AttemptState) -> None:
        ledger = Ledger(queue=queue, store=store, events=events)
        attempt, started = ledger.claim("r1", "s1", 1, worker="vm", bundle=None)
        finished = Finished(delivery, attempt, started, started + 1, state, "vm", max_attempts=3)
        settle_one(ledger._ops, finished)

    try:
        first = _take(spot_q)
        assert first is not None and first.message.fallback_topic == standard.topic
        settle(spot_q, first, AttemptState.PREEMPTED)  # 1 of K = 2: back to the Spot queue
        again = _take(spot_q)
        assert again is not None and again.message.preemptions == 1
        assert again.message.topic is None
        settle(spot_q, again, AttemptState.PREEMPTED)  # K reached: the standard queue
        assert _take(spot_q, 0.5) is None
        moved = _take(standard_q)
        assert moved is not None
        assert (moved.message.preemptions, moved.message.topic) == (2, standard.topic)
        assert moved.message.fallback_topic is None
        settle(standard_q, moved, AttemptState.FAILED)  # a task failure is retried there too
        retried = _take(standard_q)
        assert retried is not None and retried.message.failures == 1
        assert _take(spot_q, 0.5) is None
        standard_q.ack(retried)
    finally:
        spot_q.close()
        standard_q.close()
        events.close()


def test_the_mover_takes_only_its_runs_queued_shards(
    deployment: Deployment, queues: ShapeQueues
) -> None:
    spot, standard = queues.ensure(SPOT), queues.ensure(STANDARD)
    publisher = PubSubQueue(project=deployment.project, topic=spot.topic)
    publisher.publish(
        [WorkMessage(run, Shard(f"s{i}", i).to_dict()) for run in ("mine", "other") for i in (1, 2)]
    )
    publisher.close()
    mover = Mover(
        project=deployment.project,
        run_id="mine",
        subscription=spot.subscription,
        to_topic=standard.topic,
        subscriber=queues.subscriber,
        every=0.0,
    )
    spot_q, standard_q = _queue(deployment, queues, SPOT), _queue(deployment, queues, STANDARD)
    try:
        for _ in range(20):
            if mover.moved == 2:
                break
            mover()
        assert mover.moved == 2
        on_standard = standard_q.receive(10, 3.0)
        assert sorted((d.message.run_id, d.message.shard_id) for d in on_standard) == [
            ("mine", "s1"),
            ("mine", "s2"),
        ]
        assert all(d.message.topic == standard.topic for d in on_standard)
        left: list[Delivery] = []
        for _ in range(10):
            left += spot_q.receive(10, 1.0)
            if len(left) >= 2:
                break
        assert sorted(d.message.shard_id for d in left) == ["s1", "s2"]
        assert {d.message.run_id for d in left} == {"other"}  # the other run's stay on Spot
        lazy = Mover(
            project=deployment.project,
            run_id="mine",
            subscription=spot.subscription,
            to_topic=standard.topic,
            subscriber=queues.subscriber,
        )
        assert lazy() == 0 and lazy._idle_until > 0  # found nothing: it waits before the next
        lazy.close()
        for d in [*on_standard, *left]:
            (standard_q if d in on_standard else spot_q).ack(d)
    finally:
        mover.close()
        spot_q.close()
        standard_q.close()


def test_the_mover_never_dead_letters_a_concurrent_runs_queued_shard(
    deployment: Deployment, queues: ShapeQueues
) -> None:
    """Pub/Sub counts every delivery (a nack, a lapsed lease) towards the dead-letter limit: the
    mover, which pulls the other run's shard at every poll, must put it back as a new message."""
    spot, standard = queues.ensure(SPOT), queues.ensure(STANDARD)
    base = queues.subscriber.get_subscription(subscription=queues.subscription_path(SPOT))
    limit = base.dead_letter_policy.max_delivery_attempts
    assert limit >= 5  # Pub/Sub's least (the deployment's work subscription's, copied)
    publisher = PubSubQueue(project=deployment.project, topic=spot.topic)
    publisher.publish([WorkMessage("other", Shard("s1", 1).to_dict())])
    publisher.close()
    mover = Mover(
        project=deployment.project,
        run_id="mine",
        subscription=spot.subscription,
        to_topic=standard.topic,
        from_topic=spot.topic,
        subscriber=queues.subscriber,
        every=0.0,
    )
    spot_q = _queue(deployment, queues, SPOT)
    dead = PubSubQueue(project=deployment.project, subscription=deployment.dead_letter_subscription)
    try:
        for _ in range(3 * limit):  # each call is one pull, which finds the shard again
            assert mover() == 0  # nothing of its own run to move
        assert mover.returned > 2 * limit  # taken more often than the limit allows deliveries
        back = _take(spot_q)
        assert back is not None and (back.message.run_id, back.message.shard_id) == (
            "other",
            "s1",
        )
        assert back.delivery_attempt == 1  # a new message: its count started over
        spot_q.ack(back)
        assert dead.receive(10, 1.0) == []  # never dead-lettered
    finally:
        mover.close()
        spot_q.close()
        dead.close()


def test_a_shape_queue_gets_the_deployments_grants_and_a_refusal_is_one_line() -> None:
    # The emulator has no IAM (501), so the copy is checked on a stand-in of the two calls.
    from google.api_core import exceptions as gexc
    from google.iam.v1 import policy_pb2

    from worker.errors import BackendError

    grant = policy_pb2.Binding(role="roles/pubsub.subscriber", members=["serviceAccount:w@p"])

    class Iam:
        def __init__(self, refuse: bool = False) -> None:
            self.refuse = refuse
            self.set: list[dict[str, object]] = []

        def get_iam_policy(
            self, request: dict[str, str], retry: object = None
        ) -> policy_pb2.Policy:
            return policy_pb2.Policy(bindings=[grant], etag=b"source's")

        def set_iam_policy(self, request: dict[str, object], retry: object = None) -> None:
            if self.refuse:
                raise gexc.PermissionDenied("User not authorized to perform this action.")
            self.set.append(request)

    queues = ShapeQueues.__new__(ShapeQueues)
    iam = Iam()
    queues._copy_policy(iam, "projects/p/subscriptions/work", "projects/p/subscriptions/work-x")
    (copied,) = iam.set
    assert copied["resource"] == "projects/p/subscriptions/work-x"
    assert copied["policy"] == policy_pb2.Policy(bindings=[grant])
    with pytest.raises(BackendError) as refused:
        queues._copy_policy(Iam(refuse=True), "projects/p/topics/work", "projects/p/topics/work-x")
    assert str(refused.value) == (
        "could not give work-x the grants of work (User not authorized to perform this "
        "action.); the runner's account needs roles/pubsub.admin on the project"
    )
