"""The Pub/Sub queue and events beyond the contract suite: no prefetch, leases, attributes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import google.cloud.pubsub_v1 as pubsub_v1
import pytest

from tests.emulators import Deployment
from worker.backends.gcp.backend import open_gcp
from worker.backends.gcp.pubsub import PubSubQueue
from worker.backends.gcp.pubsub_events import PubSubEvents
from worker.errors import ConfigError
from worker.protocol import Event, Shard, WorkMessage
from worker.queue import Delivery

pytestmark = pytest.mark.emulator


def _messages(run_id: str, count: int) -> list[WorkMessage]:
    return [
        WorkMessage(run_id=run_id, shard=Shard(id=f"s{i}", index=i).to_dict()) for i in range(count)
    ]


@pytest.fixture
def worker_queues(deployment: Deployment) -> Iterator[list[PubSubQueue]]:
    """Three workers' queues on one subscription (the second and third with no topic)."""
    queues = [
        PubSubQueue(
            project=deployment.project,
            topic=deployment.work_topic if n == 0 else None,
            subscription=deployment.work_subscription,
            lease_seconds=10,
            max_lease_seconds=1.0 if n == 2 else None,
        )
        for n in range(3)
    ]
    yield queues
    for queue in queues:
        queue.close()


def test_messages_carry_run_and_shard_attributes(deployment: Deployment) -> None:
    queue = PubSubQueue(project=deployment.project, topic=deployment.work_topic)
    queue.publish(_messages("r-attrs", 2))
    subscriber = pubsub_v1.SubscriberClient()
    path = f"projects/{deployment.project}/subscriptions/{deployment.work_subscription}"
    got = subscriber.pull(subscription=path, max_messages=10, timeout=10).received_messages
    assert sorted(dict(r.message.attributes)["shard_id"] for r in got) == ["s0", "s1"]
    assert {dict(r.message.attributes)["run_id"] for r in got} == {"r-attrs"}
    subscriber.close()
    queue.close()


def test_a_worker_takes_no_more_than_its_free_slots(worker_queues: list[PubSubQueue]) -> None:
    first, second, _ = worker_queues
    first.publish(_messages("r-slots", 3))
    held = first.receive(1, 5.0)
    assert len(held) == 1
    rest: list[Delivery] = []
    deadline = time.monotonic() + 10
    while len(rest) < 2 and time.monotonic() < deadline:
        rest += second.receive(5, 1.0)
    assert len(rest) == 2, "the first worker must not have prefetched the others"
    for d in held + rest:
        (first if d in held else second).ack(d)


def test_leases_outlive_the_ack_deadline_until_max_lease_then_only_by_extend(
    worker_queues: list[PubSubQueue],
) -> None:
    keeper, other, capped = worker_queues  # capped: the leaser stops after 1 s
    keeper.publish(_messages("r-lease", 1))
    (kept,) = keeper.receive(1, 5.0)
    keeper.publish(_messages("r-lease-2", 2))
    held: list[Delivery] = []
    while len(held) < 2:
        held += capped.receive(2 - len(held), 5.0)
    extended, lapsing = held
    start = time.monotonic()
    while time.monotonic() - start < 12:  # past the 10 s ack deadline
        capped.extend(extended, 10)
        time.sleep(1.0)
    back = other.receive(5, 5.0)
    assert [d.message.run_id for d in back] == [lapsing.message.run_id]
    assert back[0].message.shard_id == lapsing.message.shard_id
    assert back[0].delivery_attempt == 2
    for queue, d in ((keeper, kept), (capped, extended), (other, back[0])):
        queue.ack(d)
    assert other.receive(5, 1.0) == []


def test_malformed_message_is_dropped_not_redelivered(
    deployment: Deployment, worker_queues: list[PubSubQueue]
) -> None:
    publisher = pubsub_v1.PublisherClient()
    topic = f"projects/{deployment.project}/topics/{deployment.work_topic}"
    publisher.publish(topic, b"not json").result()
    publisher.stop()
    queue = worker_queues[0]
    assert queue.receive(1, 3.0) == []
    assert queue.receive(1, 2.0) == []


def test_work_topic_is_found_from_the_subscription(worker_queues: list[PubSubQueue]) -> None:
    second = worker_queues[1]  # knows only its subscription
    assert second.publish(_messages("r-retry", 1)) == 1
    (got,) = second.receive(1, 5.0)
    assert got.message.run_id == "r-retry"
    second.ack(got)


def test_closing_the_runner_hands_buffered_events_back(deployment: Deployment) -> None:
    worker = PubSubEvents(project=deployment.project, topic=deployment.events_topic)
    for i in range(3):
        worker.publish(Event(kind="started", worker="w", run_id="r", shard_id=f"s{i}"))
    worker.close()  # flushes
    runner = PubSubEvents(project=deployment.project, subscription=deployment.events_subscription)
    (first,) = runner.pull(1, timeout=5.0)
    inbox = runner._inbox
    assert inbox is not None
    deadline = time.monotonic() + 20  # the rest arrive in the stream's buffer (slowly, on a
    while len(inbox._buffer) < 2 and time.monotonic() < deadline:  # loaded machine)
        time.sleep(0.05)
    runner.close()
    # Given back at once, not after a lease: a plain pull sees them. (A new streaming pull on
    # the emulator only sees nacked messages once something else wakes the subscription.)
    subscriber = pubsub_v1.SubscriberClient()
    path = f"projects/{deployment.project}/subscriptions/{deployment.events_subscription}"
    got = subscriber.pull(subscription=path, max_messages=10, timeout=5).received_messages
    subscriber.close()
    left = sorted(Event.from_json(r.message.data).shard_id or "" for r in got)
    assert sorted([first.shard_id or "", *left]) == ["s0", "s1", "s2"]


def test_worker_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"--subscription \(CFLOW_SUBSCRIPTION\)"):
        open_gcp(project="p", bucket="b", subscription=None, events_topic="e")


def test_idle_pulls_do_not_raise_delivery_counts_or_strand_messages(
    deployment: Deployment,
) -> None:
    """Workers polling with no time to spare (timeout 0) while shards arrive: every shard is
    delivered once, at once; none waits out an ack deadline held by an abandoned pull."""
    queues = [
        PubSubQueue(
            project=deployment.project,
            topic=deployment.work_topic,
            subscription=deployment.work_subscription,
            lease_seconds=10,
        )
        for _ in range(4)
    ]
    got: list[tuple[float, Delivery]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poll(queue: PubSubQueue) -> None:
        while not stop.is_set():
            for delivery in queue.receive(1, 0.0):
                with lock:
                    got.append((time.monotonic(), delivery))
                queue.ack(delivery)

    threads = [threading.Thread(target=poll, args=(q,), daemon=True) for q in queues]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.0)  # idle pulls first
        published = time.monotonic()
        queues[0].publish(_messages("r-idle", 20))
        deadline = published + 30
        while len(got) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for queue in queues:
            queue.close()
    assert sorted(d.message.shard_id for _, d in got) == sorted(f"s{i}" for i in range(20))
    assert [d.delivery_attempt for _, d in got] == [1] * 20
    # Stranded messages would come back only after the 10 s ack deadline.
    assert max(t for t, _ in got) - published < 8.0


def test_requeue_replaces_a_leased_message_so_its_delivery_count_starts_over(
    worker_queues: list[PubSubQueue],
) -> None:
    queue, other, _ = worker_queues
    queue.publish(_messages("r-requeue", 1))
    (first,) = queue.receive(1, 5.0)
    queue.nack(first)
    (second,) = other.receive(1, 15.0)
    assert second.delivery_attempt == 2
    bumped = WorkMessage(run_id="r-requeue", shard=second.message.shard, failures=1)
    other.requeue(second, bumped, front=True)
    (third,) = queue.receive(1, 15.0)
    assert third.delivery_attempt == 1  # a new message: the dead-letter count starts over
    assert third.message.failures == 1 and third.message.shard_id == "s0"
    queue.ack(third)
    assert other.receive(1, 1.0) == []  # the replaced one was acked, not left to come back
