"""A worker's bookkeeping of attempts: claim a number, then settle the outcome.

**Settling** an attempt is, in order: commit a success (``result.json``, create-only: the first
attempt wins, a later one is recorded ``discarded``), record a loser's or failure's
``status.json``, re-queue a retry or mark the shard failed, give a preempted shard back, ack,
and tell the runner. :func:`settle_one` is that logic, written once over a few primitive
operations (:class:`Ops`); a backend decides how they are carried out:

- :class:`Ledger` carries them out one call at a time on the store, queue and event bus
  (Google Cloud: a create-only object write, then an ack);
- :class:`worker.backends.local.ledger.LocalLedger` carries out a whole batch of attempts in one
durable
  SQLite transaction: every result is on disk before its ack, for one fsync per batch.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from worker.clock import SYSTEM_CLOCK, Clock
from worker.protocol import (
    AttemptState,
    AttemptStatus,
    Event,
    EventKind,
    Layout,
    ShardFailure,
    ShardResult,
    WorkMessage,
)
from worker.queue import Delivery, EventBus, WorkQueue
from worker.store import Store

CANCELLED = "run cancelled"


@dataclass
class Finished:
    """One ended attempt, waiting to be settled."""

    delivery: Delivery
    attempt: int
    started: float
    finished: float
    state: AttemptState
    worker: str
    max_attempts: int
    exit_code: int | None = None
    reason: str | None = None
    outputs: list[str] = field(default_factory=list)
    bundle: str | None = None
    value: Any = None  # what run(shard) returned (JSON), kept in a success's result.json
    # the shard's local files at the attempt's start and end (ShardResult.input_seen)
    input_seen: list[str | None] | None = None
    settled_as: EventKind | None = None  # set by settling: what the runner was told


class Ops(ABC):
    """The primitive writes settling needs."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool: ...

    @abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def publish(self, message: WorkMessage) -> None: ...

    @abstractmethod
    def ack(self, delivery: Delivery) -> None: ...

    @abstractmethod
    def requeue(self, delivery: Delivery, message: WorkMessage) -> None:
        """Give a preempted shard back at the front, its delivery count started over."""

    @abstractmethod
    def emit(self, event: Event) -> None: ...


def status_record(
    f: Finished, state: AttemptState, reason: str | None, finished: float | None
) -> bytes:
    message = f.delivery.message
    return AttemptStatus(
        run_id=message.run_id,
        shard_id=message.shard_id,
        attempt=f.attempt,
        state=state.value,
        worker=f.worker,
        started_at=f.started,
        finished_at=finished,
        exit_code=f.exit_code,
        reason=reason,
        bundle=f.bundle,
    ).to_json()


def running_record(
    run_id: str, shard_id: str, attempt: int, worker: str, started: float, bundle: str | None
) -> bytes:
    """An attempt's claim: its ``status.json`` while it runs."""
    return AttemptStatus(
        run_id=run_id,
        shard_id=shard_id,
        attempt=attempt,
        state=AttemptState.RUNNING.value,
        worker=worker,
        started_at=started,
        bundle=bundle,
    ).to_json()


def started_event(run_id: str, shard_id: str, attempt: int, worker: str, at: float) -> Event:
    return Event(
        kind=EventKind.STARTED.value,
        worker=worker,
        run_id=run_id,
        shard_id=shard_id,
        attempt=attempt,
        at=at,
    )


def settle_one(ops: Ops, f: Finished) -> EventKind:
    """Commit, record, retry or fail, ack and announce one attempt; what the runner is told."""
    message = f.delivery.message
    run_id, shard_id = message.run_id, message.shard_id
    state, reason = f.state, f.reason
    if state is AttemptState.SUCCEEDED:
        result = ShardResult(
            run_id=run_id,
            shard_id=shard_id,
            attempt=f.attempt,
            worker=f.worker,
            started_at=f.started,
            finished_at=f.finished,
            outputs=f.outputs,
            bundle=f.bundle,
            value=f.value,
            input_seen=f.input_seen,
        )
        if not ops.create(Layout.result(run_id, shard_id), result.to_json()):
            state, reason = AttemptState.DISCARDED, "another attempt committed first"
    if state is not AttemptState.SUCCEEDED:  # a winner's record is its result.json
        record = status_record(f, state, reason, f.finished)
        ops.put(Layout.status(run_id, shard_id, f.attempt), record)
    kind = EventKind.SUCCEEDED
    if state is AttemptState.PREEMPTED:
        ops.requeue(f.delivery, message.after_preemption())
        kind = EventKind.PREEMPTED
    elif state is AttemptState.FAILED and reason == CANCELLED:
        ops.ack(f.delivery)
        kind = EventKind.FAILED
    elif state is AttemptState.FAILED:
        failures = message.failures + 1
        if failures >= f.max_attempts:
            failure = ShardFailure(
                run_id=run_id,
                shard_id=shard_id,
                attempt=f.attempt,
                failures=failures,
                exit_code=f.exit_code,
                reason=reason or "failed",
                at=f.finished,
            )
            ops.put(Layout.failure(run_id, shard_id), failure.to_json())
            kind = EventKind.FAILED
        else:
            # Publish the next try before acking this one: a crash in between duplicates
            # the shard (harmless, first commit wins) instead of losing it.
            ops.publish(dataclasses.replace(message, failures=failures))
            kind = EventKind.RETRYING
        ops.ack(f.delivery)
    else:
        ops.ack(f.delivery)
    ops.emit(
        Event(
            kind=kind.value,
            worker=f.worker,
            run_id=run_id,
            shard_id=shard_id,
            attempt=f.attempt,
            exit_code=f.exit_code,
            detail=reason,
            at=f.finished,
        )
    )
    f.settled_as = kind
    return kind


class _DirectOps(Ops):
    def __init__(self, ledger: Ledger):
        self._l = ledger

    def create(self, key: str, data: bytes) -> bool:
        return self._l.store.create(key, data)

    def put(self, key: str, data: bytes) -> None:
        self._l.store.put(key, data)

    def publish(self, message: WorkMessage) -> None:
        self._l.queue.publish([message])

    def ack(self, delivery: Delivery) -> None:
        self._l.queue.ack(delivery)

    def requeue(self, delivery: Delivery, message: WorkMessage) -> None:
        self._l.queue.requeue(delivery, message, front=True)

    def emit(self, event: Event) -> None:
        self._l.emit(event)


class Ledger:
    """Claims and settles through the store, queue and event bus, one call at a time."""

    batches = False  # settling many attempts at once saves nothing here

    def __init__(
        self, *, queue: WorkQueue, store: Store, events: EventBus, clock: Clock = SYSTEM_CLOCK
    ):
        self.queue = queue
        self.store = store
        self.events = events
        self.clock = clock
        self._ops = _DirectOps(self)

    def claim(
        self, run_id: str, shard_id: str, hint: int, *, worker: str, bundle: str | None
    ) -> tuple[int, float]:
        """Take the first free attempt number at or after ``hint`` (create-only status) and
        announce the attempt started; the number and its start time."""
        attempt = max(hint, 1)
        while True:
            started = self.clock.time()
            record = running_record(run_id, shard_id, attempt, worker, started, bundle)
            if self.store.create(Layout.status(run_id, shard_id, attempt), record):
                break
            attempt += 1
        self.emit(started_event(run_id, shard_id, attempt, worker, started))
        return attempt, started

    def claim_many(
        self, items: list[tuple[str, str, int, str | None]], *, worker: str
    ) -> list[tuple[int, float]]:
        """:meth:`claim` for several (run, shard, hint, bundle) at once."""
        return [
            self.claim(run_id, shard_id, hint, worker=worker, bundle=bundle)
            for run_id, shard_id, hint, bundle in items
        ]

    def settle(self, batch: list[Finished]) -> None:
        for f in batch:
            try:
                settle_one(self._ops, f)
            except Exception as exc:
                # The store failed us after the claim: count the attempt as failed, so a shard
                # whose outputs cannot be stored fails within its budget instead of looping
                # until it is dead-lettered.
                logging.getLogger("cflow.worker").exception(
                    "settling attempt %d of shard %s failed", f.attempt, f.delivery.message.shard_id
                )
                failed = dataclasses.replace(
                    f, state=AttemptState.FAILED, exit_code=None, reason=f"worker error: {exc}"
                )
                settle_one(self._ops, failed)
                f.settled_as = failed.settled_as

    def extend(self, deliveries: list[Delivery], seconds: float) -> None:
        for delivery in deliveries:
            self.queue.extend(delivery, seconds)

    def emit(self, event: Event) -> None:
        try:
            self.events.publish(event)
        except Exception:  # events are advisory; the store is the truth
            logging.getLogger("cflow.worker").warning(
                "could not publish %s event", event.kind, exc_info=True
            )
