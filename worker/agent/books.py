"""The agent's side of the ledger: claim attempts for received messages, settle what ended.

Claims of one receive go to the :class:`worker.ledger.Ledger` in one call, and finished attempts
wait in their slot to be settled in batches (locally one durable transaction each). A full disk
pauses settling without losing anything; any other failure to settle gives the batch back to the
queue, to run again (the first commit wins).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from worker.agent.runbook import ManifestBroken, RunBook, Vetted
from worker.agent.slot import Claim, Slot, StopFlag
from worker.clock import Clock
from worker.errors import DiskFull
from worker.ledger import CANCELLED, Finished, Ledger
from worker.protocol import AttemptState, Event, EventKind
from worker.queue import Delivery, WorkQueue

log = logging.getLogger("cflow.worker")

SETTLE_BATCH = 64  # most attempts settled in one transaction
SETTLE_AGE = 0.02  # seconds a finished attempt may wait for its batch
DISK_FULL_PAUSE = 5.0  # seconds a worker waits before trying a full disk again


@dataclass
class Outcome:
    """How an attempt ended, as it is recorded."""

    state: AttemptState
    exit_code: int | None = None
    reason: str | None = None


class Bookkeeper:
    """Claims and settles this worker's attempts through its ledger; counts what it settled."""

    def __init__(
        self,
        *,
        queue: WorkQueue,
        ledger: Ledger,
        runs: RunBook,
        clock: Clock,
        worker: str,
        lease_seconds: float,
        stop: StopFlag,
    ):
        self.queue = queue
        self.ledger = ledger
        self.runs = runs
        self.clock = clock
        self.worker = worker
        self.lease_seconds = lease_seconds
        self._stop = stop
        self._lock = threading.Lock()
        self.completed = 0  # attempts settled (any outcome), for tests and reports
        self.last_finished = float("-inf")  # monotonic time the last batch was settled

    # -- claiming --------------------------------------------------------------------------

    def claim_all(self, slot: Slot, deliveries: list[Delivery]) -> list[Claim]:
        """Vet every received message and claim attempts for those to run, in one go."""
        wanted: list[tuple[Delivery, Vetted]] = []
        for delivery in deliveries:
            try:
                vetted = self._vet(delivery)
            except Exception as exc:
                self.not_started(slot, delivery, exc)
                continue
            if vetted is None:
                slot.release(delivery)
            else:
                wanted.append((delivery, vetted))
        if not wanted:
            return []
        try:
            numbers = self.ledger.claim_many(
                [(d.message.run_id, d.message.shard_id, v.hint, v.bundle) for d, v in wanted],
                worker=self.worker,
            )
        except Exception as exc:
            for delivery, _ in wanted:
                self.not_started(slot, delivery, exc)
            return []
        return [
            Claim(d, v.manifest, attempt, started, v.bundle)
            for (d, v), (attempt, started) in zip(wanted, numbers, strict=True)
        ]

    def claim(self, delivery: Delivery) -> Claim | None:
        """Drop one message, or claim an attempt for it (no slot: the attempt runs elsewhere)."""
        vetted = self._vet(delivery)
        if vetted is None:
            return None
        message = delivery.message
        ((attempt, started),) = self.ledger.claim_many(
            [(message.run_id, message.shard_id, vetted.hint, vetted.bundle)], worker=self.worker
        )
        return Claim(delivery, vetted.manifest, attempt, started, vetted.bundle)

    def _vet(self, delivery: Delivery) -> Vetted | None:
        """The run book's verdict on a message; one not to run is acked here."""
        vetted = self.runs.vet(delivery)
        if vetted is None:
            self.queue.ack(delivery)
        return vetted

    def not_started(self, slot: Slot, delivery: Delivery, exc: Exception) -> None:
        """A message could not even be claimed: give it back, later when waiting helps."""
        slot.release(delivery)
        if isinstance(exc, ManifestBroken):
            delay = exc.delay
            log.error("%s; shard %s comes back in %.0fs", exc, delivery.message.shard_id, delay)
        elif isinstance(exc, DiskFull):
            log.error("%s", exc)
            delay = DISK_FULL_PAUSE
        else:
            log.error("shard %s could not start: %s", delivery.message.shard_id, exc, exc_info=exc)
            delay = 0.0
        try:
            self.queue.nack(delivery, delay=delay)
        except Exception:
            log.exception("nack failed; the lease will lapse instead")
        if isinstance(exc, DiskFull):
            self.clock.sleep(DISK_FULL_PAUSE)

    def extend(self, deliveries: list[Delivery]) -> None:
        """Renew the leases of messages still being worked on."""
        self.ledger.extend(deliveries, self.lease_seconds)

    # -- settling --------------------------------------------------------------------------

    def finished(
        self,
        claim: Claim,
        outcome: Outcome,
        outputs: list[str] | None = None,
        value: Any = None,
        seen: list[str | None] | None = None,
    ) -> Finished:
        """The settlement record of a claimed attempt that ended now (``seen``: its shard's
        local files at its start and end, kept in its commit)."""
        return Finished(
            delivery=claim.delivery,
            attempt=claim.attempt,
            started=claim.started,
            finished=self.clock.time(),
            state=outcome.state,
            worker=self.worker,
            max_attempts=claim.manifest.run_options.max_attempts,
            exit_code=outcome.exit_code,
            reason=outcome.reason,
            outputs=outputs or [],
            bundle=claim.bundle,
            value=value,
            input_seen=seen,
        )

    def settle(self, slot: Slot, finished: Finished) -> None:
        """Queue an ended attempt for settling with its slot's batch; a failure goes at once."""
        slot.release(finished.delivery)
        if not slot.pending:
            slot.pending_since = time.monotonic()
        slot.pending.append(finished)
        if finished.state is AttemptState.FAILED:
            slot.failed = True
            self.flush(slot)  # the runner's halt rule wants to hear of it now
        self.runs.record(  # after the failure is on record: it may halt the run
            finished.delivery.message.run_id,
            finished.state,
            bundle=finished.bundle,
            reason=finished.reason,
            exit_code=finished.exit_code,
        )

    def settle_now(self, finished: Finished) -> None:
        """Settle one attempt at once, outside any slot's batch (an attempt run elsewhere)."""
        self.ledger.settle([finished])

    def maybe_flush(self, slot: Slot) -> None:
        """Settle the slot's batch once it is full or old enough (at once without batching)."""
        if slot.pending and (
            len(slot.pending) >= SETTLE_BATCH
            or time.monotonic() - slot.pending_since >= SETTLE_AGE
            or not self.ledger.batches
        ):
            self.flush(slot)

    def flush(self, slot: Slot) -> None:
        """Settle the slot's batch now; wait out a full disk, give the batch back on failure."""
        self.withdraw_cancelled(slot.pending)
        while slot.pending:
            try:
                self.ledger.settle(slot.pending)
            except DiskFull as exc:
                if self._stop.is_set():
                    log.error("%s; %d attempts stay unsettled", exc, len(slot.pending))
                    slot.pending = []
                    return
                log.error("%s", exc)
                self.clock.sleep(DISK_FULL_PAUSE)
                self.extend([f.delivery for f in slot.pending])
                continue
            except Exception:
                # Nothing of the batch was written: its shards run again (first commit wins).
                log.exception(
                    "could not settle %d attempts; they will run again", len(slot.pending)
                )
                for f in slot.pending:
                    with contextlib.suppress(Exception):
                        self.queue.nack(f.delivery)
                slot.pending = []
                return
            with self._lock:
                self.completed += len(slot.pending)
                self.last_finished = self.clock.monotonic()
            slot.pending = []

    def withdraw_cancelled(self, batch: list[Finished]) -> None:
        """Make the successes of a run cancelled since they ran (or retried with another task)
        cancelled attempts, which never commit. Each run's manifest is read afresh right before
        the commit, once per run and bundle in the batch: a cancel never goes unseen behind the
        copy a worker keeps (``manifest_ttl``), however short the attempt."""
        verdicts: dict[tuple[str, str], bool] = {}
        for f in batch:
            if f.state is not AttemptState.SUCCEEDED or f.bundle is None:
                continue
            key = (f.delivery.message.run_id, f.bundle)
            if key not in verdicts:
                verdicts[key] = self.runs.superseded(*key)
            if verdicts[key]:
                log.info(
                    "shard %s: run %s was cancelled; not committed",
                    f.delivery.message.shard_id,
                    key[0],
                )
                f.state, f.reason = AttemptState.FAILED, CANCELLED

    def give_back(self, slot: Slot) -> None:
        """Return received messages this slot did not get to (stopping): not a delivery. A
        claimed attempt that never started is recorded preempted, so no claim stays running."""
        for claim in slot.unstarted:
            preempted = Outcome(AttemptState.PREEMPTED, None, "worker stopped before it started")
            self.settle(slot, self.finished(claim, preempted))
        slot.unstarted = []
        for delivery in slot.held:
            try:
                self.queue.requeue(delivery, delivery.message, front=True)
            except Exception:
                log.warning(
                    "could not give back shard %s; its lease will lapse",
                    delivery.message.shard_id,
                    exc_info=True,
                )
        slot.held = []

    def emit(self, kind: EventKind, **fields: object) -> None:
        """Tell the runner something of this worker (advisory: a lost event loses nothing)."""
        self.ledger.emit(Event(kind=kind.value, worker=self.worker, **fields))  # type: ignore[arg-type]
