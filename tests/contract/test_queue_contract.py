"""What every WorkQueue must do: at-least-once delivery with leases, ack, nack, dead letters."""

from __future__ import annotations

import dataclasses
import time

from worker.backends.base import Backends
from worker.protocol import Shard, WorkMessage


def _messages(run_id: str, count: int) -> list[WorkMessage]:
    return [
        WorkMessage(run_id=run_id, shard=Shard(id=f"s{i:03d}", index=i, input=f"/in/{i}").to_dict())
        for i in range(count)
    ]


def _receive_all(b: Backends, want: int, *, timeout: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += b.queue.receive(want - len(got), 1.0)
    return got


def test_published_messages_arrive_with_their_contents(backends: Backends) -> None:
    sent = _messages("r-contract-1", 5)
    assert backends.queue.publish(sent) == 5
    got = _receive_all(backends, 5)
    assert sorted(d.message.shard_id for d in got) == [m.shard_id for m in sent]
    assert all(d.delivery_attempt == 1 for d in got)
    assert {d.message.run_id for d in got} == {"r-contract-1"}
    for d in got:
        backends.queue.ack(d)


def test_acked_message_is_not_delivered_again(backends: Backends) -> None:
    """Watched until a lease has lapsed for sure: a second message, received with it and given
    back for one full lease after the ack, comes back; the acked one never does."""
    backends.queue.publish(_messages("r-contract-2", 2))
    acked, witness = sorted(_receive_all(backends, 2), key=lambda d: d.message.shard_id)
    backends.queue.ack(acked)
    lease = float(backends.queue.lease_seconds)  # type: ignore[attr-defined]
    backends.queue.nack(witness, delay=lease)  # back once a lease taken now would have lapsed
    seen: list[str] = []
    deadline = time.monotonic() + lease + 60
    while witness.message.shard_id not in seen:
        assert time.monotonic() < deadline, f"the nacked message never came back: {seen}"
        got = backends.queue.receive(2, 1.0)
        seen += [d.message.shard_id for d in got]
        for d in got:
            backends.queue.ack(d)
    assert seen == [witness.message.shard_id]


def test_nacked_message_comes_back_at_once_with_a_higher_delivery_count(backends: Backends) -> None:
    backends.queue.publish(_messages("r-contract-3", 1))
    (first,) = _receive_all(backends, 1)
    backends.queue.nack(first)
    (again,) = _receive_all(backends, 1, timeout=10.0)
    assert again.message == first.message
    assert again.delivery_attempt >= 2
    backends.queue.ack(again)


def test_receive_respects_max_messages(backends: Backends) -> None:
    backends.queue.publish(_messages("r-contract-4", 3))
    got = backends.queue.receive(1, 5.0)
    assert len(got) == 1
    rest = _receive_all(backends, 2)
    assert len({d.message.shard_id for d in got + rest}) == 3
    for d in got + rest:
        backends.queue.ack(d)


def test_failure_count_travels_with_the_message(backends: Backends) -> None:
    (message,) = _messages("r-contract-5", 1)
    backends.queue.publish([WorkMessage(run_id=message.run_id, shard=message.shard, failures=2)])
    (got,) = _receive_all(backends, 1)
    assert got.message.failures == 2
    backends.queue.ack(got)


def test_receive_on_an_empty_queue_waits_then_returns_nothing(backends: Backends) -> None:
    start = time.monotonic()
    assert backends.queue.receive(1, 0.5) == []
    assert time.monotonic() - start >= 0.4  # it waited (how much longer is the backend's own)


def test_message_redelivered_after_repeated_nacks_goes_to_dead_letters(backends: Backends) -> None:
    """A message that keeps coming back (e.g. it kills its worker) ends up dead-lettered."""
    backends.queue.publish(_messages("r-contract-6", 1))
    dead: list[WorkMessage] = []
    deadline = time.monotonic() + 60
    while not dead and time.monotonic() < deadline:
        for d in backends.queue.receive(1, 1.0):
            backends.queue.nack(d)
        dead = backends.queue.dead_letters()
    assert [m.shard_id for m in dead] == ["s000"]
    assert backends.queue.dead_letters() == []  # taken once


def test_a_shard_preempted_more_often_than_the_delivery_limit_is_never_dead_lettered(
    backends: Backends,
) -> None:
    """Preemption gives the shard back with ``requeue``: its own count goes up, the queue's
    delivery count starts over, so the dead-letter limit (3 here locally, 5 on the emulator's
    subscription) only ever counts deliveries that crashed a worker."""
    (message,) = _messages("r-contract-7", 1)
    backends.queue.publish([message])
    for n in range(12):
        (got,) = _receive_all(backends, 1)
        assert got.message.preemptions == n
        assert got.delivery_attempt == 1
        backends.queue.requeue(got, dataclasses.replace(got.message, preemptions=n + 1), front=True)
    (last,) = _receive_all(backends, 1)
    assert last.message.preemptions == 12
    assert backends.queue.dead_letters() == []
    backends.queue.ack(last)


def test_a_message_nacked_with_a_delay_comes_back_after_it(backends: Backends) -> None:
    backends.queue.publish(_messages("r-contract-8", 1))
    (first,) = _receive_all(backends, 1)
    backends.queue.nack(first, delay=2.0)
    start = time.monotonic()
    (again,) = _receive_all(backends, 1, timeout=30.0)
    assert time.monotonic() - start >= 1.5
    backends.queue.ack(again)
