"""The agent loop in-process on the local backend, in burst mode."""

from __future__ import annotations

import itertools
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from worker.agent.agent import Agent, AgentConfig
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.bundle import pack
from worker.ledger import Ledger
from worker.protocol import (
    AttemptStatus,
    EventKind,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    ShardFailure,
    ShardResult,
    WorkMessage,
)

TASK = """
import sys
from pathlib import Path

def run(shard):
    if shard.params.get("fail_until", 0) >= shard.attempt:
        sys.exit(5)
    (Path(shard.output_dir) / "out.txt").write_text(f"{shard.id}\\n")
"""


def _setup(tmp_path: Path, shards: list[Shard], **options: object) -> tuple[Backends, Manifest]:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(textwrap.dedent(TASK))
    b = open_local(tmp_path / "store")
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    manifest = Manifest(
        run_id="r-agent",
        bundle=sha,
        entry="python",
        shard_count=len(shards),
        options=RunOptions(**options).to_dict(),
    )  # type: ignore[arg-type]
    b.store.put(Layout.manifest(manifest.run_id), manifest.to_json())
    b.queue.publish(WorkMessage(run_id=manifest.run_id, shard=s.to_dict()) for s in shards)
    return b, manifest


def _agent(b: Backends, tmp_path: Path, name: str = "w1", slots: int = 2, **given: Any) -> Agent:
    """An agent in burst mode on the backend's ledger, unless ``given`` another (or a clock)."""
    given.setdefault("ledger", b.ledger)
    return Agent(
        queue=b.queue,
        store=b.store,
        events=b.events,
        config=AgentConfig(
            name=name, scratch=tmp_path / "scratch", slots=slots, burst=True, poll_seconds=0.2
        ),
        **given,
    )


def test_burst_run_commits_every_shard(tmp_path: Path) -> None:
    shards = [Shard(id=f"s{i}", index=i) for i in range(6)]
    b, m = _setup(tmp_path, shards)
    assert _agent(b, tmp_path).run() == "queue empty"
    for s in shards:
        result = ShardResult.from_json(b.store.get(Layout.result(m.run_id, s.id)))
        assert result.attempt == 1 and result.outputs == ["out.txt"] and result.worker == "w1"
        status = AttemptStatus.from_json(b.store.get(Layout.status(m.run_id, s.id, 1)))
        assert status.state == "running"  # the claim; the winner's record is result.json
    kinds = [e.kind for e in b.events.pull()]
    assert kinds.count("started") == 6 and kinds.count("succeeded") == 6 and "idle" in kinds


def test_failures_retry_then_mark_failed(tmp_path: Path) -> None:
    shards = [
        Shard(id="flaky", index=0, params={"fail_until": 1}),
        Shard(id="poison", index=1, params={"fail_until": 99}),
    ]
    b, m = _setup(tmp_path, shards, max_attempts=3)
    _agent(b, tmp_path).run()
    assert ShardResult.from_json(b.store.get(Layout.result(m.run_id, "flaky"))).attempt == 2
    failure = ShardFailure.from_json(b.store.get(Layout.failure(m.run_id, "poison")))
    assert failure.failures == 3 and failure.exit_code == 5 and failure.attempt == 3
    assert not b.store.exists(Layout.result(m.run_id, "poison"))
    assert b.queue.stats().queued == 0


def test_duplicate_delivery_commits_once(tmp_path: Path) -> None:
    shard = Shard(id="dup", index=0)
    b, m = _setup(tmp_path, [shard])
    b.queue.publish([WorkMessage(run_id=m.run_id, shard=shard.to_dict())])  # at-least-once
    _agent(b, tmp_path, slots=2).run()
    statuses = sorted(
        AttemptStatus.from_json(b.store.get(k)).state
        for k in b.store.list(Layout.shard_prefix(m.run_id, "dup"), suffix="status.json")
    )
    assert statuses == ["discarded", "running"]  # the winner's record is its result.json
    winner = ShardResult.from_json(b.store.get(Layout.result(m.run_id, "dup"))).attempt
    assert b.store.exists(Layout.outputs(m.run_id, "dup", winner) + "out.txt")


def test_messages_of_cancelled_or_unknown_runs_are_dropped(tmp_path: Path) -> None:
    b, m = _setup(tmp_path, [Shard(id="a", index=0)])
    b.store.put(Layout.manifest(m.run_id), m.with_state(RunState.CANCELLED).to_json())
    b.queue.publish([WorkMessage(run_id="r-unknown", shard=Shard(id="b", index=0).to_dict())])
    _agent(b, tmp_path).run()
    assert list(b.store.list("runs/r-agent/shards/")) == []
    assert list(b.store.list("runs/r-unknown/")) == []
    assert b.queue.stats().queued == 0 and b.queue.stats().leased == 0


def test_missing_bundle_fails_the_shard_with_a_reason(tmp_path: Path) -> None:
    b, m = _setup(tmp_path, [Shard(id="a", index=0)], max_attempts=1)
    b.store.delete(Layout.bundle(m.bundle))
    _agent(b, tmp_path).run()
    failure = ShardFailure.from_json(b.store.get(Layout.failure(m.run_id, "a")))
    assert "task bundle" in failure.reason and "missing" in failure.reason


def test_idle_timeout_counts_from_the_last_finished_attempt(tmp_path: Path) -> None:
    """A worker busy for longer than its idle timeout must not leave the moment it is done."""
    from worker.clock import FakeClock

    _setup(tmp_path, [Shard(id="a", index=0)])
    clock = FakeClock(start=time.time())  # the message was published on the real clock
    b = open_local(tmp_path / "store", clock=clock)  # the queue waits on the same fake clock
    agent = Agent(
        queue=b.queue,
        store=b.store,
        events=b.events,
        clock=clock,
        ledger=b.ledger,
        config=AgentConfig(name="w", scratch=tmp_path / "s", idle_timeout=30, poll_seconds=1.0),
    )
    original = agent.attempts.attempt

    def slow_attempt(slot, claim, prepared=None):  # type: ignore[no-untyped-def]
        clock.advance(100)  # the shard takes 100 s of (fake) time, past the idle timeout
        original(slot, claim, prepared)

    agent.attempts.attempt = slow_attempt  # type: ignore[method-assign]
    start = clock.monotonic()
    assert agent.run().startswith("idle")
    # it waited its full idle timeout after the 100 s shard, not 0 s
    assert clock.monotonic() - start >= 130


def test_a_backup_of_a_committed_shard_is_skipped(tmp_path: Path) -> None:
    shard = Shard(id="a", index=0)
    b, m = _setup(tmp_path, [shard])
    _agent(b, tmp_path).run()
    b.queue.publish([WorkMessage(run_id=m.run_id, shard=shard.to_dict(), backup=True)])
    _agent(b, tmp_path).run()
    claims = list(b.store.list(Layout.shard_prefix(m.run_id, "a"), suffix="status.json"))
    assert len(claims) == 1  # the backup never claimed an attempt
    assert b.queue.stats().queued == 0


def test_a_store_failure_after_the_claim_counts_as_a_failed_attempt(tmp_path: Path) -> None:
    b, m = _setup(tmp_path, [Shard(id="a", index=0)], max_attempts=2)
    with b.store.db.transaction() as conn:  # type: ignore[attr-defined]
        conn.execute(  # the store itself refuses every commit marker, as a broken one would
            "CREATE TRIGGER refuse BEFORE INSERT ON records WHEN NEW.key GLOB '*/result.json'"
            " BEGIN SELECT RAISE(ABORT, 'commit refused'); END"
        )
    one_at_a_time = Ledger(queue=b.queue, store=b.store, events=b.events)
    agent = _agent(b, tmp_path, ledger=one_at_a_time)
    agent.run()
    failure = ShardFailure.from_json(b.store.get(Layout.failure(m.run_id, "a")))
    assert failure.failures == 2 and failure.reason.startswith("worker error: ")
    assert failure.reason.endswith("queue.db: commit refused"), failure.reason
    statuses = [
        AttemptStatus.from_json(b.store.get(k)).state
        for k in b.store.list(Layout.shard_prefix(m.run_id, "a"), suffix="status.json")
    ]
    assert statuses == ["failed", "failed"]  # recorded, not left "running"


def test_a_cached_cancelled_manifest_is_checked_again_before_dropping(tmp_path: Path) -> None:
    """cancel, then retry at once: a worker that cached the cancelled state must not drop
    the retried shards (a drop acks the message: it would be lost)."""
    shard = Shard(id="a", index=0)
    b, m = _setup(tmp_path, [shard])
    b.store.put(Layout.manifest(m.run_id), m.with_state(RunState.CANCELLED).to_json())
    agent = _agent(b, tmp_path)
    agent.run()  # drops the queued message and caches the cancelled manifest
    b.store.put(Layout.manifest(m.run_id), m.to_json())  # `runner retry` made it active again
    b.queue.publish([WorkMessage(run_id=m.run_id, shard=shard.to_dict())])
    agent.run()
    assert b.store.exists(Layout.result(m.run_id, "a"))


def test_an_idle_worker_keeps_only_the_last_task_host(tmp_path: Path) -> None:
    b, _ = _setup(tmp_path, [Shard(id="a", index=0)])
    agent = _agent(b, tmp_path)
    agent.run()
    task2 = tmp_path / "task2"
    task2.mkdir()
    (task2 / "task.py").write_text("def run(shard):\n    pass\n")
    data, sha = pack(task2)
    b.store.put(Layout.bundle(sha), data)
    second = Manifest(run_id="r-agent2", bundle=sha, entry="python", shard_count=1)
    b.store.put(Layout.manifest(second.run_id), second.to_json())
    b.queue.publish([WorkMessage(run_id=second.run_id, shard=Shard(id="b", index=0).to_dict())])
    agent.config = AgentConfig(
        name="w1", scratch=tmp_path / "scratch", burst=True, idle_timeout=None, poll_seconds=0.2
    )
    agent.run()
    assert b.store.exists(Layout.result(second.run_id, "b"))
    assert agent.pool.keys() == [f"{sha}:0"]  # the first run's host was closed when idle


def test_an_unreadable_manifest_backs_off_instead_of_burning_deliveries(tmp_path: Path) -> None:
    from worker.clock import FakeClock

    shards = [Shard(id=f"s{i}", index=i) for i in range(3)]
    _, m = _setup(tmp_path, shards)
    clock = FakeClock(start=time.time())  # the messages were published on the real clock
    b = open_local(tmp_path / "store", clock=clock)  # the queue's back-off on the same clock
    good = b.store.get(Layout.manifest(m.run_id))
    b.store.put(Layout.manifest(m.run_id), good[: len(good) // 2])  # truncated
    agent = _agent(b, tmp_path, slots=1, clock=clock)
    agent.run()  # burst: every message was put back with a delay, so the queue looks empty
    stats = b.queue.stats(m.run_id)
    assert stats.dead == 0 and (stats.queued or 0) + (stats.leased or 0) == 3
    assert not list(b.store.list(Layout.shards_prefix(m.run_id)))  # nothing claimed or failed
    b.store.put(Layout.manifest(m.run_id), good)  # the user repaired it
    agent.run()
    assert not list(b.store.list(Layout.shards_prefix(m.run_id)))  # still backing off
    clock.advance(2.0)  # the first back-off
    agent.run()
    assert all(b.store.exists(Layout.result(m.run_id, s.id)) for s in shards)


def test_a_full_disk_at_settling_loses_nothing(tmp_path: Path) -> None:
    """The settling transaction finds the disk full: the worker waits and settles the same
    attempts once there is room, losing and failing none.

    A unit test cannot fill a disk under one transaction: that takes a small file system, and
    mounting one takes root (tests/e2e/test_promises_runner.py fills a real one). So the
    ledger raises the DiskFull that SQLite's own "disk is full" becomes, as
    tests/unit/test_local_queue.py shows with a real one, for its first two batches."""
    from worker.backends.local.ledger import LocalLedger
    from worker.clock import FakeClock
    from worker.errors import DiskFull

    shards = [Shard(id=f"s{i}", index=i) for i in range(4)]
    b, m = _setup(tmp_path, shards)
    clock = FakeClock(start=time.time())  # the pauses between tries take no real time
    agent = _agent(b, tmp_path, slots=1, clock=clock)
    real = LocalLedger.settle
    calls = {"n": 0}

    def settle(self: LocalLedger, batch: list) -> None:  # type: ignore[type-arg]
        calls["n"] += 1
        if calls["n"] <= 2:
            raise DiskFull("the disk is full")
        real(self, batch)

    agent.ledger.settle = settle.__get__(agent.ledger)  # type: ignore[method-assign]
    agent.run()
    assert calls["n"] >= 3
    for s in shards:
        assert ShardResult.from_json(b.store.get(Layout.result(m.run_id, s.id))).attempt == 1
    assert not list(b.store.list(Layout.shards_prefix(m.run_id), suffix="failed.json"))
    stats = b.queue.stats(m.run_id)
    assert (stats.queued, stats.leased, stats.dead) == (0, 0, 0)


def test_a_crash_in_a_batch_sent_ahead_fails_only_its_own_shard(tmp_path: Path) -> None:
    """Short shards queue in one warm host; when one kills it, the shards queued behind it
    never ran: they run again on a fresh host instead of failing."""
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(
        textwrap.dedent(
            """
            import os
            from pathlib import Path

            def run(shard):
                if shard.index == 2:
                    os._exit(3)
                (Path(shard.output_dir) / "pid.txt").write_text(str(os.getpid()))
            """
        )
    )
    b = open_local(tmp_path / "store")
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    shards = [Shard(id=f"s{i}", index=i) for i in range(8)]
    m = Manifest(
        run_id="r-ahead",
        bundle=sha,
        entry="python",
        shard_count=len(shards),
        options=RunOptions(max_attempts=1).to_dict(),
    )
    b.store.put(Layout.manifest(m.run_id), m.to_json())
    b.queue.publish(WorkMessage(run_id=m.run_id, shard=s.to_dict()) for s in shards)
    agent = Agent(
        queue=b.queue,
        store=b.store,
        events=b.events,
        ledger=b.ledger,
        config=AgentConfig(
            name="w", scratch=tmp_path / "s", burst=True, poll_seconds=0.2, first_prefetch=8
        ),
    )
    agent.run()
    failure = ShardFailure.from_json(b.store.get(Layout.failure(m.run_id, "s2")))
    assert failure.exit_code == 3
    pids = set()
    for s in shards:
        if s.index == 2:
            continue
        result = ShardResult.from_json(b.store.get(Layout.result(m.run_id, s.id)))
        assert result.attempt == 1  # never counted as a failure
        out = b.store.local_path(Layout.outputs(m.run_id, s.id, 1) + "pid.txt")
        assert out is not None
        pids.add(out.read_text())
    assert len(pids) == 2  # the first host before the crash, a fresh one after it


def test_an_idle_worker_says_so_again_every_heartbeat(tmp_path: Path) -> None:
    """A runner that began listening after the first idle word (a retry, a resumed watch)
    hears within a heartbeat that the worker is free."""
    from worker.clock import FakeClock

    _setup(tmp_path, [Shard(id="a", index=0)])
    clock = FakeClock(start=time.time())
    b = open_local(tmp_path / "store", clock=clock)
    config = AgentConfig(
        name="w", scratch=tmp_path / "s", idle_timeout=35, heartbeat=10, poll_seconds=1.0
    )
    agent = Agent(
        queue=b.queue, store=b.store, events=b.events, clock=clock, ledger=b.ledger, config=config
    )
    said: list[float] = []  # when (on its clock) it said it is idle
    emit = agent.books.emit

    def noted(kind: EventKind, *args: Any, **kwargs: Any) -> None:
        if kind is EventKind.IDLE:
            said.append(clock.monotonic())
        emit(kind, *args, **kwargs)

    agent.books.emit = noted  # type: ignore[method-assign]
    assert agent.run().startswith("idle")
    assert len([e for e in b.events.pull(1000) if e.kind == "idle"]) == len(said) == 4
    # Its first idle word once the shard was done, then one at 10, 20 and 30 s of idleness.
    gaps = [later - earlier for earlier, later in itertools.pairwise(said)]
    assert all(10 <= gap < 11 for gap in gaps), gaps


def test_a_worker_whose_empty_receive_is_held_says_it_is_idle_while_it_waits(
    tmp_path: Path,
) -> None:
    """Pub/Sub holds an empty pull for seconds: the worker says it is idle while its receive
    is held, so the run's runner can let it go without waiting for the pull to come back."""
    from worker.backends.local.queue import LocalQueue

    b, _ = _setup(tmp_path, [])
    order: list[str] = []
    said = threading.Event()

    class HeldQueue(LocalQueue):
        holds_empty_receives = True

        def receive(self, max_messages: int, timeout: float, *, worker: str | None = None) -> Any:
            got = super().receive(max_messages, 0.0, worker=worker)
            if not got:  # held until the worker speaks (10 s at most), as a server holds it
                order.append("held")
                order.append("answered" if said.wait(10) else "held to the end")
            return got

    queue = HeldQueue(tmp_path / "store" / "queue.db", db=b.queue.db)  # type: ignore[attr-defined]
    agent = Agent(
        queue=queue,
        store=b.store,
        events=b.events,
        config=AgentConfig(name="w", scratch=tmp_path / "s", idle_timeout=0.1, poll_seconds=5),
    )
    emit = agent.books.emit

    def noted(kind: EventKind, *args: Any, **kwargs: Any) -> None:
        if kind is EventKind.IDLE:
            order.append("idle")
            said.set()
        emit(kind, *args, **kwargs)

    agent.books.emit = noted  # type: ignore[method-assign]
    assert agent.run().startswith("idle")
    assert order == ["held", "idle", "answered"]  # said once, while the receive was held


def test_a_batch_is_settled_while_the_next_one_runs_and_all_before_the_worker_ends(
    tmp_path: Path,
) -> None:
    """A batch's settlements (one durable commit locally) are made once the next batch is
    claimed and sent to its task host, so the commit and the host's work overlap; the last
    batch is settled when a look finds nothing more, before the worker idles or ends."""
    shards = [Shard(id=f"s{i}", index=i) for i in range(7)]
    b, m = _setup(tmp_path, shards)
    agent = _agent(b, tmp_path, slots=1)
    ledger = agent.ledger
    seen: list[tuple[str, list[str]]] = []
    claim_many, settle = ledger.claim_many, ledger.settle

    def claiming(wanted: list, **kwargs: Any) -> Any:  # type: ignore[type-arg]
        seen.append(("claim", [shard for _, shard, _, _ in wanted]))
        return claim_many(wanted, **kwargs)

    def settling(batch: list) -> None:  # type: ignore[type-arg]
        seen.append(("settle", [f.delivery.message.shard_id for f in batch]))
        settle(batch)

    ledger.claim_many = claiming  # type: ignore[method-assign]
    ledger.settle = settling  # type: ignore[method-assign]
    assert agent.run() == "queue empty"
    claims = [i for i, (what, _) in enumerate(seen) if what == "claim"]
    first_settle = next(i for i, (what, _) in enumerate(seen) if what == "settle")
    # The first batch is settled only once the second is claimed (and sent to the host).
    assert len(claims) >= 2 and claims[1] < first_settle, seen
    assert seen[-1][0] == "settle"  # nothing claimed is left unsettled
    settled = [sid for what, ids in seen if what == "settle" for sid in ids]
    assert sorted(settled) == sorted(s.id for s in shards)  # each once
    for s in shards:
        assert ShardResult.from_json(b.store.get(Layout.result(m.run_id, s.id))).attempt == 1


POISON_TASK = """
import os
from pathlib import Path

def run(shard):
    if shard.params.get("poison"):  # its working folder replaced by a file
        here = os.getcwd()
        os.chdir("/")
        os.rmdir(here)
        Path(here).write_text("not a folder")
    (Path(shard.output_dir) / "out.txt").write_text(shard.id)
"""


def test_what_a_task_leaves_in_its_folders_place_never_stops_the_next_shards(
    tmp_path: Path,
) -> None:
    """A shard that leaves a file where its working folder was: the next attempts there get a
    new folder (the file goes), and a shard whose start ahead fails anyway is started on its
    own instead of taking the worker down with its batch."""
    from worker.agent.attempt import AttemptRunner

    shards = [Shard(id=f"s{i}", index=i, params={"poison": i == 1}) for i in range(6)]
    b, m = _setup(tmp_path, shards)
    task = tmp_path / "task" / "task.py"
    task.write_text(textwrap.dedent(POISON_TASK))
    data, sha = pack(task.parent)
    b.store.put(Layout.bundle(sha), data)
    manifest = Manifest.from_json(b.store.get(Layout.manifest(m.run_id)))
    manifest = Manifest(**{**manifest.__dict__, "bundle": sha})
    b.store.put(Layout.manifest(m.run_id), manifest.to_json())
    agent = _agent(b, tmp_path, slots=1)
    launch, failed = AttemptRunner.launch, []

    def launch_once_failing(self: AttemptRunner, slot: Any, prepared: Any) -> None:
        if prepared.claim.delivery.message.shard_id == "s4" and not failed:
            failed.append("s4")
            raise OSError("no room to start it ahead")
        launch(self, slot, prepared)

    agent.attempts.launch = launch_once_failing.__get__(agent.attempts)  # type: ignore[method-assign]
    assert agent.run() == "queue empty"
    assert failed == ["s4"]
    for s in shards:
        result = ShardResult.from_json(b.store.get(Layout.result(m.run_id, s.id)))
        assert result.attempt == 1 and result.outputs == ["out.txt"], s.id
