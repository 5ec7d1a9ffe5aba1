"""One claimed attempt from start to settlement: prepare, run, supervise, seal, settle.

While the task runs, the attempt's leases are extended and a heartbeat sent every
``heartbeat`` seconds, the run is checked for cancellation, and the log is moved where users
read it. An attempt that fails in the worker itself (after its claim) still counts as a failed
attempt, so a shard whose outputs cannot be stored fails within its budget.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from worker.agent.books import Bookkeeper, Outcome
from worker.agent.files import AttemptLog, seal_outputs, stage_input
from worker.agent.pool import ExecutorPool
from worker.agent.runbook import RunBook
from worker.agent.slot import Claim, Slot, StopFlag
from worker.clock import Clock
from worker.errors import CFlowError
from worker.executors.base import RunningTask, TaskExecutor
from worker.executors.container.runtime import (
    ContainerRuntimeMissing,
    GpuSupportMissing,
    ImagePullError,
)
from worker.ledger import CANCELLED
from worker.protocol import AttemptState, Entry, EventKind, Layout, RunState
from worker.store import Store
from worker.taskapi import TaskShard

log = logging.getLogger("cflow.worker")

_STEP = 0.2  # seconds between checks while a task runs (stop requests, deadlines)
_SHOW_LOG = 1.0  # seconds an attempt runs before its log is moved where users read it
_FIRST_WAIT = 0.01  # seconds before a still-running task lets pending settlements through
_PREEMPTED = "worker stopped (preemption)"


@dataclass
class Prepared:
    """An attempt made ready to start (or already failed before it could)."""

    claim: Claim
    log: AttemptLog
    out_dir: Path
    executor: TaskExecutor | None = None
    shard: TaskShard | None = None
    task: RunningTask | None = None
    early: Outcome | None = None


class AttemptRunner:
    """Runs claimed attempts on a slot and hands each ended one to the bookkeeper."""

    def __init__(
        self,
        *,
        store: Store,
        runs: RunBook,
        books: Bookkeeper,
        pool: ExecutorPool,
        clock: Clock,
        stop: StopFlag,
        worker: str,
        preempt_grace: float,
        heartbeat: float,
        log_upload_seconds: float,
    ):
        self.store = store
        self.runs = runs
        self.books = books
        self.pool = pool
        self.clock = clock
        self._stop = stop
        self.worker = worker
        self.preempt_grace = preempt_grace
        self.heartbeat = heartbeat
        self.log_upload_seconds = log_upload_seconds

    def attempt_safely(self, slot: Slot, claim: Claim, prepared: Prepared | None = None) -> None:
        """Run one claimed attempt and settle it; an error of the worker fails the attempt."""
        try:
            self.attempt(slot, claim, prepared)
        except Exception as exc:  # after the claim: the attempt counts as failed
            shard_id = claim.delivery.message.shard_id
            log.exception("attempt of shard %s failed in the worker", shard_id)
            failed = Outcome(AttemptState.FAILED, None, f"worker error: {exc}")
            self.books.settle(slot, self.books.finished(claim, failed))

    def attempt(self, slot: Slot, claim: Claim, prepared: Prepared | None = None) -> None:
        """Run one claimed attempt (``prepared``: already started ahead), seal its outputs,
        store its log and settle it."""
        if prepared is None:
            prepared = self.prepare(slot, claim, 0)
        run_id, shard_id = claim.manifest.run_id, claim.delivery.message.shard_id
        try:
            outcome, reason_hint = self.run(slot, prepared)
            outputs = seal_outputs(self.store, run_id, shard_id, claim.attempt, prepared.out_dir)
            prepared.log.store()
        except Exception as exc:
            # The attempt is claimed: record it and count it, so a shard whose outputs cannot be
            # stored fails within its budget instead of looping until it is dead-lettered.
            log.exception("attempt %d of shard %s failed in the worker", claim.attempt, shard_id)
            error = Outcome(AttemptState.FAILED, None, f"worker error: {exc}")
            outcome, reason_hint, outputs = error, None, []
            shutil.rmtree(prepared.out_dir, ignore_errors=True)
        if outcome.state is AttemptState.FAILED and reason_hint:
            outcome.reason = reason_hint
        self.books.settle(slot, self.books.finished(claim, outcome, outputs))

    def start_ahead(self, slot: Slot) -> dict[int, Prepared]:
        """Short shards of one warm host: send them all at once, so the host never waits for
        the worker's bookkeeping between two of them (each keeps its own log and outputs).
        Keyed by ``id()`` of their claims."""
        claims = slot.unstarted
        first = claims[0]
        same = all(
            c.bundle == first.bundle
            and not c.manifest.run_options.isolate
            and c.manifest.run_options.image is None
            for c in claims
        )
        if not same or Entry(first.manifest.entry) is not Entry.PYTHON:
            return {}
        ahead: dict[int, Prepared] = {}
        for position, claim in enumerate(claims):
            prepared = self.prepare(slot, claim, position)
            if prepared.executor is not None and not prepared.executor.queues:
                return ahead  # the task does not import: one at a time shows why
            if prepared.early is None:
                self.launch(slot, prepared)
            ahead[id(claim)] = prepared
        return ahead

    def stop_ahead(self, ahead: dict[int, Prepared]) -> None:
        """Stopping: stop the attempts started ahead that were not run (queued in the host)."""
        for prepared in ahead.values():
            if prepared.task is not None:
                prepared.task.stop(self.preempt_grace)

    def prepare(self, slot: Slot, claim: Claim, position: int) -> Prepared:
        """The attempt's executor, staged input, log and output folder (its own per position
        of a batch started ahead); a failure here fails the attempt before it starts."""
        manifest = claim.manifest
        options = manifest.run_options
        run_id, shard = manifest.run_id, claim.delivery.message.shard_record
        if not slot.ready:  # once per slot: a fresh scratch folder, whatever a crash left
            shutil.rmtree(slot.scratch, ignore_errors=True)
            slot.scratch.mkdir(parents=True, exist_ok=True)
            slot.ready = True
        key = Layout.log(run_id, shard.id, claim.attempt)
        prepared = Prepared(
            claim=claim,
            log=AttemptLog(slot.scratch / f"log-{position}.txt", self.store, key),
            out_dir=slot.scratch / f"out-{position}",
        )
        try:
            prepared.executor = self.pool.get(claim.bundle, Entry(manifest.entry), options)
            work = slot.scratch / f"input-{position}"
            staged = stage_input(self.store, shard, options.stage, work, self.worker)
        except (ImagePullError, ContainerRuntimeMissing, GpuSupportMissing) as exc:
            # Not this shard's fault: no shard of the run can start here. Stop the whole run
            # with the reason, instead of failing every shard's every attempt with it.
            self.runs.halt(run_id, str(exc))
            prepared.log.note(str(exc))
            prepared.early = Outcome(AttemptState.FAILED, reason=str(exc))
            return prepared
        except (CFlowError, OSError) as exc:
            prepared.log.note(str(exc))
            prepared.early = Outcome(AttemptState.FAILED, reason=str(exc))
            return prepared
        prepared.shard = TaskShard(
            run_id=run_id,
            id=shard.id,
            index=shard.index,
            attempt=claim.attempt,
            input=staged,
            output_dir=prepared.out_dir,
            params=shard.params or {},
        )
        return prepared

    def launch(self, slot: Slot, prepared: Prepared) -> None:
        """Start a prepared attempt on the slot's executor."""
        assert prepared.executor is not None and prepared.shard is not None
        prepared.task = prepared.executor.start(prepared.shard, prepared.log.path, slot=slot.index)

    def run(self, slot: Slot, prepared: Prepared) -> tuple[Outcome, str | None]:
        """Run a prepared attempt to its end: how it ended, and the task's own account of a
        failure (its exception, or its log's last line)."""
        if prepared.early is not None:
            return prepared.early, None
        if prepared.task is None:
            self.launch(slot, prepared)
        assert prepared.task is not None
        outcome = self.supervise(slot, prepared.claim, prepared.task, prepared.log)
        if getattr(prepared.task, "not_started", False) and not self._stop.is_set():
            # The host died under an earlier shard of the batch: this one never ran. Run it.
            self.launch(slot, prepared)
            outcome = self.supervise(slot, prepared.claim, prepared.task, prepared.log)
        hint = prepared.task.reason
        if hint is None and outcome.state is AttemptState.FAILED:
            hint = prepared.log.last_line()
        return outcome, hint

    def supervise(
        self, slot: Slot, claim: Claim, task: RunningTask, attempt_log: AttemptLog
    ) -> Outcome:
        """Wait for a started attempt; meanwhile extend its leases, send heartbeats, stop it
        when the worker stops, its run is cancelled or its timeout passes, show its log."""
        clock, grace = self.clock, self.preempt_grace
        manifest = claim.manifest
        timeout = manifest.run_options.timeout
        start = clock.monotonic()
        last_beat = last_upload = start
        code = task.wait(_FIRST_WAIT)
        if code is None and slot.pending:  # a longer shard: settle the finished ones first
            self.books.flush(slot)
        while True:
            if code is not None:
                if code == 0:
                    return Outcome(AttemptState.SUCCEEDED, 0)
                if self._stop.is_set() and (code < 0 or getattr(task, "not_started", False)):
                    return Outcome(AttemptState.PREEMPTED, code, _PREEMPTED)
                return Outcome(AttemptState.FAILED, code, _describe_exit(code))
            now = clock.monotonic()
            if self._stop.is_set():
                code = task.stop(grace)
                return Outcome(AttemptState.PREEMPTED, code, _PREEMPTED)
            if now - start >= timeout:
                code = task.stop(grace)
                return Outcome(AttemptState.FAILED, code, f"timed out after {timeout:g}s")
            if now - last_beat >= self.heartbeat:
                last_beat = now
                self.books.extend(slot.held)
                self.books.emit(
                    EventKind.HEARTBEAT,
                    run_id=manifest.run_id,
                    shard_id=claim.delivery.message.shard_id,
                    attempt=claim.attempt,
                )
                current = self.runs.manifest(manifest.run_id)
                if current is not None and current.state == RunState.CANCELLED.value:
                    code = task.stop(grace)
                    return Outcome(AttemptState.FAILED, code, CANCELLED)
            if now - last_upload >= min(self.log_upload_seconds, _SHOW_LOG):
                last_upload = now
                attempt_log.show()
            code = task.wait(_STEP)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"
