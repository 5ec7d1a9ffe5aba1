"""The Pub/Sub queue and events beyond the contract suite: no prefetch, leases, attributes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

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


def _until_back(queue: PubSubQueue, shard_id: str, *, limit: float = 60.0) -> list[Delivery]:
    """Receive until the message of ``shard_id`` comes back; everything received till then."""
    back: list[Delivery] = []
    deadline = time.monotonic() + limit
    while shard_id not in {d.message.shard_id for d in back}:
        assert time.monotonic() < deadline, f"{shard_id} never came back"
        back += queue.receive(5, 1.0)
    return back


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
    capped.extend(extended, 3600)  # the agent's horizon: kept past max_lease_seconds
    # The lapsing message comes back once its 10 s ack deadline passed, unrenewed; the two
    # received no later than it, one kept by the leaser and one by extend, stay leased.
    back = _until_back(other, lapsing.message.shard_id)
    assert [(d.message.run_id, d.message.shard_id) for d in back] == [
        (lapsing.message.run_id, lapsing.message.shard_id)
    ]
    assert back[0].delivery_attempt == 2
    for queue, d in ((keeper, kept), (capped, extended), (other, back[0])):
        queue.ack(d)


def test_malformed_message_is_dropped_not_redelivered(
    deployment: Deployment, worker_queues: list[PubSubQueue], caplog: pytest.LogCaptureFixture
) -> None:
    """Acked when it is dropped: watched on the subscription itself, past the ack deadline a
    dropped but unacked message would have had (a well-formed message given back for one full
    lease after it comes back first)."""
    publisher = pubsub_v1.PublisherClient()
    topic = f"projects/{deployment.project}/topics/{deployment.work_topic}"
    publisher.publish(topic, b"not json").result()
    publisher.stop()
    queue = worker_queues[0]
    deadline = time.monotonic() + 60
    while "dropping a malformed work message" not in caplog.text:
        assert time.monotonic() < deadline, "the malformed message never arrived"
        assert queue.receive(1, 1.0) == []  # never handed to the agent
    queue.publish(_messages("r-malformed", 1))
    (witness,) = _until_back(queue, "s0")
    queue.nack(witness, delay=queue.lease_seconds)
    subscriber = pubsub_v1.SubscriberClient()
    path = f"projects/{deployment.project}/subscriptions/{deployment.work_subscription}"
    pulled: list[bytes] = []
    try:
        while not any(b"r-malformed" in data for data in pulled):
            assert time.monotonic() < deadline + queue.lease_seconds, pulled
            got = subscriber.pull(subscription=path, max_messages=10, timeout=5).received_messages
            pulled += [r.message.data for r in got]
            if got:
                subscriber.acknowledge(subscription=path, ack_ids=[r.ack_id for r in got])
    finally:
        subscriber.close()
    assert b"not json" not in pulled and len(pulled) == 1


def test_work_topic_is_found_from_the_subscription(worker_queues: list[PubSubQueue]) -> None:
    second = worker_queues[1]  # knows only its subscription
    assert second.publish(_messages("r-retry", 1)) == 1
    (got,) = second.receive(1, 5.0)
    assert got.message.run_id == "r-retry"
    second.ack(got)


def test_closing_the_runner_hands_buffered_events_back(deployment: Deployment) -> None:
    # A subscription of its own with a long ack deadline; the client library leases what its
    # stream buffers for at least 10 s more at a time. Events seen again within GIVEN_BACK of
    # the close were given back by it, not redelivered once a lease ran out.
    subscriber = pubsub_v1.SubscriberClient()
    sub_id = f"{deployment.events_subscription}-given-back"
    path = f"projects/{deployment.project}/subscriptions/{sub_id}"
    topic = f"projects/{deployment.project}/topics/{deployment.events_topic}"
    subscriber.create_subscription(
        request={"name": path, "topic": topic, "ack_deadline_seconds": LONG_ACK_DEADLINE}
    )
    worker = PubSubEvents(project=deployment.project, topic=deployment.events_topic)
    for i in range(3):
        worker.publish(Event(kind="started", worker="w", run_id="r", shard_id=f"s{i}"))
    worker.close()  # flushes
    runner = PubSubEvents(project=deployment.project, subscription=sub_id)
    (first,) = runner.pull(1, timeout=5.0)
    inbox = runner._inbox
    assert inbox is not None
    deadline = time.monotonic() + 20  # the rest arrive in the stream's buffer (slowly, on a
    while len(inbox._buffer) < 2 and time.monotonic() < deadline:  # loaded machine)
        time.sleep(0.05)
    assert len(inbox._buffer) == 2, "the stream never buffered the other two events"
    closed = time.monotonic()
    runner.close()
    # Plain pulls see them again long before the deadline. (A pull may answer with fewer
    # messages than are there, so pull until both came; a new streaming pull on the emulator
    # only sees nacked messages once something else wakes the subscription.)
    got: list[Any] = []
    while len(got) < 2 and time.monotonic() - closed < GIVEN_BACK:
        got += subscriber.pull(subscription=path, max_messages=10, timeout=2).received_messages
    subscriber.delete_subscription(subscription=path)
    subscriber.close()
    left = sorted(Event.from_json(r.message.data).shard_id or "" for r in got)
    assert sorted([first.shard_id or "", *left]) == ["s0", "s1", "s2"]


LONG_ACK_DEADLINE = 120  # seconds
GIVEN_BACK = 9.0  # seconds: under the shortest lease the client library takes


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
    got: list[Delivery] = []
    lock = threading.Lock()
    stop = threading.Event()
    idle = [threading.Event() for _ in queues]

    def poll(n: int, queue: PubSubQueue) -> None:
        while not stop.is_set():
            for delivery in queue.receive(1, 0.0):
                with lock:
                    got.append(delivery)
                queue.ack(delivery)
            idle[n].set()

    threads = [
        threading.Thread(target=poll, args=(n, q), daemon=True) for n, q in enumerate(queues)
    ]
    for thread in threads:
        thread.start()
    try:
        for pulled in idle:  # every worker has polled an empty queue first
            assert pulled.wait(60)
        queues[0].publish(_messages("r-idle", 20))
        deadline = time.monotonic() + 60
        while len(got) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        for queue in queues:
            queue.close()
    assert sorted(d.message.shard_id for d in got) == sorted(f"s{i}" for i in range(20))
    # A message handed to a pull its client abandoned counts that delivery and comes back
    # only after the ack deadline, as attempt 2: every one came on its first.
    assert [d.delivery_attempt for d in got] == [1] * 20


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
