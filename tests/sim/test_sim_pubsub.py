"""The simulated Pub/Sub subscription keeps Pub/Sub's promises on virtual time."""

from __future__ import annotations

from runner.sim.clock import SimClock
from runner.sim.pubsub import SimEvents, SimPubSub
from worker.protocol import Event, WorkMessage


def _queue(max_deliveries: int = 20) -> tuple[SimClock, SimPubSub]:
    clock = SimClock()
    queue = SimPubSub(
        clock, ack_deadline=60.0, min_backoff=10.0, max_backoff=300.0, max_deliveries=max_deliveries
    )
    queue.publish([WorkMessage(run_id="r1", shard={"id": "s1", "index": 0})])
    return clock, queue


def test_a_lapsed_lease_comes_back_after_the_retry_backoff_and_its_stale_ack_is_lost() -> None:
    clock, queue = _queue()
    [first] = queue.receive(1, 0.0)
    clock.run_until(60.0)
    assert queue.receive(1, 0.0) == []  # lapsed at 60 s, backing off until 70 s
    clock.run_until(70.0)
    [second] = queue.receive(1, 0.0)
    assert second.delivery_attempt == 2
    queue.ack(first)  # the first holder's lease is gone: its ack must not drop the message
    assert queue.counts["stale_acks"] == 1 and queue.backlog == 0 and queue.leased == 1
    queue.ack(second)
    assert queue.leased == 0 and queue.receive(1, 0.0) == []


def test_extensions_keep_a_lease_and_nacks_back_off_exponentially() -> None:
    clock, queue = _queue()
    [d] = queue.receive(1, 0.0)
    for t in range(10, 200, 10):
        clock.run_until(float(t))
        queue.extend(d, 60.0)
    assert queue.receive(1, 0.0) == [] and queue.counts["lapsed"] == 0
    queue.nack(d)
    clock.run_until(clock.now + 10.0)
    [d] = queue.receive(1, 0.0)
    queue.nack(d)
    clock.run_until(clock.now + 19.0)
    assert queue.receive(1, 0.0) == []  # second retry waits 20 s
    clock.run_until(clock.now + 1.0)
    assert len(queue.receive(1, 0.0)) == 1


def test_a_message_delivered_too_often_goes_to_the_dead_letter_queue() -> None:
    clock, queue = _queue(max_deliveries=2)
    for _ in range(2):
        [d] = queue.receive(1, 0.0)
        queue.nack(d)
        clock.run_until(clock.now + 300.0)
    assert queue.receive(1, 0.0) == []
    [dead] = queue.dead_letters()
    assert dead.shard_id == "s1" and queue.dead_letters() == []


def test_events_arrive_after_their_latency_in_order() -> None:
    clock = SimClock()
    events = SimEvents(clock, latency=0.5)
    events.publish(Event(kind="idle", worker="a"))
    events.publish(Event(kind="idle", worker="b"))
    assert events.pull() == []
    clock.run_until(0.5)
    assert [e.worker for e in events.pull()] == ["a", "b"]
