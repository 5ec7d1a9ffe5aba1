"""Leases, extension, redelivery and dead letters of the SQLite queue, on an injected clock."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import pytest

from worker.backends.local.queue import FENCE_SECONDS, LocalQueue
from worker.clock import FakeClock
from worker.protocol import Shard, WorkMessage
from worker.queue import QueueStats


def _queue(tmp_path: Path, clock: FakeClock, **kw: float) -> LocalQueue:
    return LocalQueue(tmp_path / "q.db", clock=clock, **kw)  # type: ignore[arg-type]


def _msg(i: int, run: str = "r-q") -> WorkMessage:
    return WorkMessage(run_id=run, shard=Shard(id=f"s{i}", index=i).to_dict())


def test_lease_hides_a_message_until_it_lapses(tmp_path: Path) -> None:
    clock = FakeClock()
    q = _queue(tmp_path, clock, lease_seconds=60)
    q.publish([_msg(0)])
    (d,) = q.receive(1, 0)
    assert q.receive(1, 0) == []
    clock.advance(59)
    assert q.receive(1, 0) == []
    clock.advance(2)
    (again,) = q.receive(1, 0)  # the holder died without acking: redelivered
    assert again.message == d.message and again.delivery_attempt == 2


def test_extend_keeps_a_long_task_from_being_redelivered(tmp_path: Path) -> None:
    clock = FakeClock()
    q = _queue(tmp_path, clock, lease_seconds=10)
    q.publish([_msg(0)])
    (d,) = q.receive(1, 0)
    for _ in range(30):  # five minutes of heartbeats every 10 s
        clock.advance(9)
        q.extend(d, 10)
        assert q.receive(1, 0) == []
    q.ack(d)
    clock.advance(100)
    assert q.receive(1, 0) == []


def test_a_stale_holder_cannot_extend_or_nack_a_relet_message(tmp_path: Path) -> None:
    clock = FakeClock()
    q = _queue(tmp_path, clock, lease_seconds=10)
    q.publish([_msg(0)])
    (old,) = q.receive(1, 0)
    clock.advance(11)
    (_new,) = q.receive(1, 0)
    q.extend(old, 1000)
    q.nack(old)
    assert q.receive(1, 0) == []  # still leased by the new holder
    assert q.stats().leased == 1


def test_dead_letter_after_max_deliveries(tmp_path: Path) -> None:
    clock = FakeClock()
    q = _queue(tmp_path, clock, lease_seconds=5, max_deliveries=3)
    q.publish([_msg(0), _msg(1)])
    for _ in range(3):
        for d in q.receive(2, 0):
            if d.message.shard_id == "s0":
                continue  # s0's worker dies every time: its lease lapses
            q.ack(d)
        clock.advance(6)
    assert q.receive(2, 0) == []
    assert [m.shard_id for m in q.dead_letters()] == ["s0"]
    assert q.stats().dead == 0


def test_purge_drops_queued_messages_of_one_run_only(tmp_path: Path) -> None:
    q = _queue(tmp_path, FakeClock())
    q.publish([_msg(i, "r-a") for i in range(3)] + [_msg(9, "r-b")])
    (_leased,) = q.receive(1, 0)
    assert q.purge("r-a") == 2
    assert q.stats("r-a").queued == 0 and q.stats("r-a").leased == 1
    assert q.stats("r-b").queued == 1


def test_publish_streams_large_batches(tmp_path: Path) -> None:
    q = _queue(tmp_path, FakeClock())
    assert q.publish(_msg(i) for i in range(5000)) == 5000
    assert q.stats().queued == 5000
    assert len(q.receive(100, 0)) == 100


def test_a_requeued_shard_goes_to_the_front_and_a_dead_workers_leases_are_released(
    tmp_path: Path,
) -> None:
    q = LocalQueue(tmp_path / "q.db", lease_seconds=60)
    q.publish(WorkMessage(run_id="r-front", shard={"id": f"s{i}", "index": i}) for i in range(5))
    (first,) = q.receive(1, 0.1, worker="w1")
    q.receive(1, 0.1, worker="w2")
    assert q.leases("r-front") == {"s0": "w1", "s1": "w2"}
    q.requeue(first, dataclasses.replace(first.message, preemptions=1), front=True)
    (again,) = q.receive(1, 0.1, worker="w3")
    assert again.message.shard_id == "s0" and again.message.preemptions == 1  # ahead of s2..s4
    assert q.release("w2") == 1  # the fleet saw w2 die: its shard is available at once
    (back,) = q.receive(1, 0.1, worker="w3")
    assert back.message.shard_id == "s1"
    assert q.pending("r-front") == {f"s{i}" for i in range(5)}
    q.ack(back)
    assert "s1" not in (q.pending("r-front") or set())


def test_a_full_database_refuses_a_whole_settlement_and_takes_it_later(tmp_path: Path) -> None:
    """SQLite's own "database or disk is full" (a page limit on the settling connection: the
    file may not grow, as on a full disk) is a DiskFull, and the batch is all or nothing."""
    from worker.backends.local.backend import open_local
    from worker.backends.local.store import LocalStore
    from worker.errors import DiskFull
    from worker.ledger import Finished
    from worker.protocol import AttemptState, Layout

    b = open_local(tmp_path / "store")
    b.queue.publish(_msg(i) for i in range(50))
    deliveries = b.queue.receive(50, 0, worker="w")
    claims = b.ledger.claim_many(
        [(d.message.run_id, d.message.shard_id, 1, None) for d in deliveries], worker="w"
    )
    batch = [
        Finished(d, attempt, started, started + 1, AttemptState.SUCCEEDED, "w", 3, 0)
        for d, (attempt, started) in zip(deliveries, claims, strict=True)
    ]
    store = b.store
    assert isinstance(store, LocalStore)
    conn = store.db.conn()  # this thread's: the one the settling below writes through
    (pages,) = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(DiskFull, match="is full"):
        b.ledger.settle(batch)
    assert not list(store.list("runs/", suffix="result.json"))  # nothing half-written
    assert b.queue.stats().leased == 50  # still leased: the worker tries again
    conn.execute(f"PRAGMA max_page_count = {pages * 100}")  # room again
    b.ledger.settle(batch)
    committed = set(store.list("runs/", suffix="result.json"))
    assert committed == {Layout.result("r-q", f"s{i}") for i in range(50)}
    assert b.queue.stats() == QueueStats(queued=0, leased=0, dead=0)
    b.close()


def test_a_fenced_worker_leases_nothing_and_one_that_just_took_work_is_not_fenced(
    tmp_path: Path,
) -> None:
    """The look at a worker's leases and the fence are one step: a worker seen holding nothing
    takes nothing after it, and one that took a shard before it is kept (the runner's scale-down
    once stopped a worker that received a shard between the look and the stop)."""
    clock = FakeClock()
    runner, worker = _queue(tmp_path, clock), _queue(tmp_path, clock)  # two connections
    worker.publish([_msg(0), _msg(1, run="r-other")])
    (held,) = worker.receive(1, 0, worker="w-busy")
    assert held.message.run_id == "r-q"
    assert runner.fence(["w-busy", "w-idle"], set()) == ["w-idle"]
    assert runner.fence(["w-busy"], {"r-q"}) == ["w-busy"]  # its own run's, once it is over
    assert worker.receive(5, 0, worker="w-idle") == []
    assert worker.receive(5, 0, worker="w-busy") == []
    (other,) = worker.receive(5, 0, worker="w-free")  # an unfenced worker still gets work
    assert other.message.run_id == "r-other"
    worker.nack(other)
    assert runner.release("w-idle") == 0  # gone: its name, if given again, is not fenced
    (again,) = worker.receive(5, 0, worker="w-idle")
    assert again.message.run_id == "r-other"
    worker.nack(again)
    clock.advance(FENCE_SECONDS + 1)  # never stopped (its runner died): it works again
    (late,) = worker.receive(5, 0, worker="w-busy")
    assert late.message.run_id == "r-other"


def test_an_interrupted_receive_returns_at_its_next_look_and_every_later_one_at_once(
    tmp_path: Path,
) -> None:
    """A worker told to stop (SIGTERM: Agent.stop) no longer waits out its wait for work: its
    bell ends the pause under way, and no receive waits after it. On the system's clock, as a
    worker of one run waits on its bell."""
    q = LocalQueue(tmp_path / "q.db", run_id="r-q")
    got: list[object] = []
    waiting = threading.Thread(target=lambda: got.append(q.receive(1, 30.0, worker="local-0")))
    began = time.monotonic()
    waiting.start()
    time.sleep(0.2)  # well into its wait, its bell opened
    q.interrupt()
    waiting.join(20.0)
    assert not waiting.is_alive() and got == [[]]
    assert time.monotonic() - began < 20.0  # ended by the interrupt, not by the 30 s
    again = time.monotonic()
    assert q.receive(1, 30.0, worker="local-0") == []
    assert time.monotonic() - again < 20.0
    q.publish([_msg(0)])
    assert len(q.receive(1, 30.0, worker="local-0")) == 1  # what is there is still taken
    q.close()
