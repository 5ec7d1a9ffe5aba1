"""One claimed attempt from start to settlement: prepare, run, supervise, seal, settle.

While the task runs, the attempt's leases are extended and a heartbeat sent every
``heartbeat`` seconds, the run is checked for cancellation, and the log is moved where users
read it. An attempt that fails in the worker itself (after its claim) still counts as a failed
attempt, so a shard whose outputs cannot be stored fails within its budget.
"""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker import defaults
from worker.agent.books import Bookkeeper, Outcome
from worker.agent.files import AttemptLog, local_seen, seal_outputs, stage_input, take_return
from worker.agent.pool import ExecutorPool
from worker.agent.runbook import RunBook
from worker.agent.slot import Claim, Slot, StopFlag
from worker.clock import Clock
from worker.errors import CFlowError, DiskFull, TaskError
from worker.executors.base import RunningTask, TaskExecutor, clear_cwd
from worker.executors.container.gpus import GpuSupportMissing
from worker.executors.container.runtime import ContainerRuntimeMissing, ImagePullError
from worker.ledger import CANCELLED
from worker.protocol import AttemptState, Entry, EventKind, Layout
from worker.store import Store
from worker.taskapi import TaskShard

log = logging.getLogger("cflow.worker")

_STEP = 0.2  # seconds between checks while a task runs (stop requests, deadlines)
_SHOW_LOG = 1.0  # seconds an attempt runs before its log is moved where users read it
_CANCEL_CHECK = defaults.CANCEL_CHECK_SECONDS
_FIRST_WAIT = 0.01  # seconds before a still-running task lets pending settlements through
_PREEMPTED = "worker stopped (preemption)"
_LOST_TO_ANOTHER = "stopped: another attempt of the shard committed first"


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
    seen: str | None = None  # the shard's local files before it started (files.local_seen)


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
        value = None
        seen: list[str | None] | None = None
        try:
            outcome = self.run(slot, prepared)
            if outcome.state is AttemptState.PREEMPTED and self.store.exists(
                Layout.result(run_id, shard_id)
            ):  # a backup's loser let go: no preemption, and nothing to run again
                outcome = Outcome(AttemptState.DISCARDED, outcome.exit_code, _LOST_TO_ANOTHER)
            try:
                task = prepared.task
                returned = take_return(prepared.out_dir, task.returned if task else None)
            except TaskError as exc:  # the attempt's own doing: it fails, with the reason
                outcome = Outcome(AttemptState.FAILED, outcome.exit_code, str(exc))
                returned = None
            try:
                outputs = seal_outputs(
                    self.store,
                    run_id,
                    shard_id,
                    claim.attempt,
                    prepared.out_dir,
                    contained=claim.manifest.run_options.image is not None,
                )
            except TaskError as exc:  # outputs it cannot commit: dropped, and a success fails
                prepared.log.note(str(exc))
                outputs = []
                if outcome.state is AttemptState.SUCCEEDED:
                    outcome = Outcome(AttemptState.FAILED, outcome.exit_code, str(exc))
            if outcome.state is AttemptState.SUCCEEDED:
                value = returned
                if prepared.seen is not None:  # what it read may have changed while it ran
                    seen = [prepared.seen, local_seen(claim.delivery.message.shard_record)]
            prepared.log.store()
        except Exception as exc:
            # The attempt is claimed: record it and count it, so a shard whose outputs cannot be
            # stored fails within its budget instead of looping until it is dead-lettered.
            log.exception("attempt %d of shard %s failed in the worker", claim.attempt, shard_id)
            outcome = Outcome(AttemptState.FAILED, None, f"worker error: {exc}")
            outputs, value = [], None
            shutil.rmtree(prepared.out_dir, ignore_errors=True)
        if prepared.shard is not None:  # what the attempt left in its working folder goes
            clear_cwd(prepared.shard)
        finished = self.books.finished(claim, outcome, outputs, value=value, seen=seen)
        self.books.settle(slot, finished)

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
            try:
                prepared = self.prepare(slot, claim, position)
                if prepared.executor is not None and not prepared.executor.queues:
                    return ahead  # the task does not import: one at a time shows why
                if prepared.early is None:
                    self.launch(slot, prepared)
            except Exception:  # this one and the rest start one at a time, failing as they do
                sid = claim.delivery.message.shard_id
                log.warning("shard %s could not be started ahead", sid, exc_info=True)
                return ahead
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
            prepared.seen = local_seen(shard)
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

    def run(self, slot: Slot, prepared: Prepared) -> Outcome:
        """Run a prepared attempt to its end: how it ended and, when it failed, why: what the
        worker did to it (a timeout, a cancel), the signal that killed it, the task's own
        exception, or the last line it printed before it exited non-zero."""
        if prepared.early is not None:
            return prepared.early
        if prepared.task is None:
            self.launch(slot, prepared)
        assert prepared.task is not None
        outcome = self.supervise(slot, prepared.claim, prepared.task, prepared.log)
        if getattr(prepared.task, "not_started", False) and not self._stop.is_set():
            # The host died under an earlier shard of the batch: this one never ran. Run it.
            self.launch(slot, prepared)
            outcome = self.supervise(slot, prepared.claim, prepared.task, prepared.log)
        if outcome.state is AttemptState.FAILED and outcome.reason is None:
            outcome.reason = failure_reason(
                outcome.exit_code, prepared.task.reason, prepared.log.last_line
            )
        return outcome

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
        last_check = start
        while True:
            if code is not None:
                if code == 0:
                    # Whether its run was cancelled meanwhile is looked at right before the
                    # commit (Bookkeeper.flush), with the manifest read afresh.
                    return Outcome(AttemptState.SUCCEEDED, 0)
                if self._stop.is_set() and (code < 0 or getattr(task, "not_started", False)):
                    return Outcome(AttemptState.PREEMPTED, code, _PREEMPTED)
                return Outcome(AttemptState.FAILED, code)  # ended on its own: run() says why
            now = clock.monotonic()
            if self._stop.is_set():
                code = task.stop(grace)
                return Outcome(AttemptState.PREEMPTED, code, _PREEMPTED)
            if now - start >= timeout:
                loading = getattr(task, "loading", False)  # its host still imports task.py
                code = task.stop(grace)
                late = f"timed out after {timeout:g}s" + (" importing task.py" if loading else "")
                return Outcome(AttemptState.FAILED, code, late)
            if now - last_beat >= self.heartbeat:
                last_beat = now
                self._beat(slot, claim, manifest.run_id)
            if now - last_check >= min(self.heartbeat, _CANCEL_CHECK):
                last_check = now
                if self.runs.superseded(manifest.run_id, claim.bundle):
                    code = task.stop(grace)
                    return Outcome(AttemptState.FAILED, code, CANCELLED)
            if now - last_upload >= min(self.log_upload_seconds, _SHOW_LOG):
                last_upload = now
                attempt_log.show()
            code = task.wait(_STEP)

    def _beat(self, slot: Slot, claim: Claim, run_id: str) -> None:
        """Extend the slot's leases and say the attempt lives. A full disk (local store) only
        delays this: the task keeps running, and the next beat tries again; the attempt must not
        fail for the worker's own bookkeeping."""
        try:
            self.books.extend(slot.held)
            self.books.emit(
                EventKind.HEARTBEAT,
                run_id=run_id,
                shard_id=claim.delivery.message.shard_id,
                attempt=claim.attempt,
            )
        except DiskFull as exc:
            log.warning("heartbeat of %s put off: %s", claim.delivery.message.shard_id, exc)


def failure_reason(code: int | None, told: str | None, last_line: Callable[[], str | None]) -> str:
    """Why an attempt that ended on its own failed: a signal's name, the task's own account
    (a Python exception's line), or else the last line it printed, as a shell task's error
    usually is."""
    if code is not None and code < 0:
        return killed_by(-code)
    if told:
        return told
    if code is not None and 128 < code < 128 + signal.NSIG:
        # A shell reports a command that a signal ended as 128 + the signal's number.
        cause = killed_by(code - 128)
        said = f"exited with code {code}, as a shell does when a command it ran was {cause}"
        last = last_line()
        return f"{said}; its last line: {last}" if last else said
    return last_line() or f"exited with code {code}"


def killed_by(number: int) -> str:
    """``killed by SIGKILL (out of memory?)``, ``killed by SIGSEGV``, ...: a signal by name."""
    try:
        name = signal.Signals(number).name
    except ValueError:
        return f"killed by signal {number}"
    if number == signal.SIGKILL:  # the worker's own kills say why; this one came from outside
        return f"killed by {name} (out of memory?)"
    return f"killed by {name}"
