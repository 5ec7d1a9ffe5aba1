"""The worker agent: receive shards, run them, seal their outputs, commit, ack.

One loop per slot (the first in the calling thread: one slot, no thread hand-offs). A slot
receives a few messages at once when shards are short, and for each:

1. looks up the run's manifest (cached); drops messages of unknown or cancelled runs, and backs
   off from a run whose manifest cannot be read;
2. **claims** an attempt number create-only and announces it started;
3. runs the task (:mod:`worker.executors.process`: a warm Python process per slot, or bash),
extending
   the leases it holds, uploading the log and watching for cancellation while it runs;
4. when the attempt ends, every process it started is gone; its outputs are **sealed** (moved
   out of the task's reach into the attempt's prefix, read-only) before anything is committed;
5. **settles** it through the :mod:`worker.ledger`: commit (first attempt wins), retry or fail,
   ack, event. Locally a batch of settlements is one durable transaction.

On SIGTERM (how a Spot preemption starts) the agent stops receiving, stops its tasks, records
them ``preempted`` and gives them back at the front of the queue; a preemption never counts as a
failure or as a delivery.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker import defaults
from worker.backends.local.db import DiskFull
from worker.bundle import UnpackedBundle, unpack
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, CFlowError, NotFound, TaskError
from worker.executors import reaper
from worker.executors.container.executor import ContainerExecutor
from worker.executors.container.runtime import (
    ContainerRuntimeMissing,
    GpuSupportMissing,
    ImagePullError,
)
from worker.executors.process import SPARE_HOSTS, Executor, RunningTask
from worker.ledger import CANCELLED, Finished, Ledger
from worker.protocol import (
    AttemptState,
    Entry,
    Event,
    EventKind,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
)
from worker.queue import Delivery, EventBus, WorkQueue
from worker.store import Store
from worker.taskapi import TaskShard

log = logging.getLogger("cflow.worker")

_STEP = 0.2  # seconds between checks while a task runs (stop requests, deadlines)
_SHOW_LOG = 1.0  # seconds an attempt runs before its log is moved where users read it
_FIRST_WAIT = 0.01  # seconds before a still-running task lets pending settlements through
FAST_SHARD = 0.025  # seconds: shards shorter than this are received several at a time
MAX_PREFETCH = 32  # most messages one slot holds at once
SETTLE_BATCH = 64  # most attempts settled in one transaction
SETTLE_AGE = 0.02  # seconds a finished attempt may wait for its batch
BROKEN_BACKOFF = (2.0, 120.0)  # seconds: redelivery delay for a run whose manifest is broken
LOCAL_POLL = 0.02  # seconds a local receive waits before the loop looks at stop requests
FAILING_PACE = (0.05, 2.0)  # seconds: first and longest pause after failures with no success
DISK_FULL_PAUSE = 5.0  # seconds a worker waits before trying a full disk again


@dataclass(frozen=True)
class AgentConfig:
    name: str
    scratch: Path
    slots: int = defaults.SLOTS
    burst: bool = False  # exit once no work is left (tests, the local backend)
    idle_timeout: float | None = None  # exit after this long with nothing to do
    lease_seconds: float = defaults.LEASE_SECONDS
    heartbeat: float = defaults.HEARTBEAT_SECONDS
    log_upload_seconds: float = defaults.LOG_UPLOAD_SECONDS
    manifest_ttl: float = defaults.MANIFEST_TTL
    preempt_grace: float = defaults.PREEMPT_GRACE
    poll_seconds: float = defaults.POLL_SECONDS
    first_prefetch: int = 1  # messages a slot receives at once before it has timed a shard


@dataclass
class _Outcome:
    state: AttemptState
    exit_code: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Claim:
    """An attempt this worker has claimed and announced, not yet finished."""

    delivery: Delivery
    manifest: Manifest
    attempt: int
    started: float
    bundle: str


@dataclass
class _Prepared:
    """An attempt made ready to start (or already failed before it could)."""

    claim: Claim
    log: _Log
    out_dir: Path
    executor: Executor | ContainerExecutor | None = None
    shard: TaskShard | None = None
    task: RunningTask | None = None
    early: _Outcome | None = None


class ManifestBroken(CFlowError):
    """A run's ``run.json`` cannot be read."""


class _Log:
    """An attempt's log: written in the slot's scratch folder, stored only when it has text.

    Locally the file is moved into the store (a rename, on the same disk) once the attempt has
    run for a moment, so ``runner logs --follow`` reads it while it grows: the task keeps
    writing to the same file. A short shard that prints nothing touches no store folder.
    """

    def __init__(self, path: Path, store: Store, key: str):
        self.path = path
        self._store = store
        self.key = key
        self.target = store.local_path(key)

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def show(self) -> None:
        """While it runs: make the log readable where the store keeps it."""
        if self.target is None:
            if self._size():
                self._store.put_file(self.key, self.path)
        elif self.path != self.target:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, self.target)
            self.path = self.target

    def store(self) -> None:
        """When it ended: store a log with text; leave an empty one for the next attempt."""
        if self.path == self.target:
            return
        if not self._size():
            return
        if self.target is None:
            self._store.put_file(self.key, self.path)
            self.path.unlink(missing_ok=True)
        else:
            self.show()


class _Flag:
    """A stop flag a signal handler may set: no lock, unlike threading.Event (whose handler,
    interrupting itself, would wait forever for its own lock)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class _Slot:
    """One slot's state: the messages it holds and the attempts waiting to be settled."""

    def __init__(self, index: int, scratch: Path):
        self.index = index
        self.ready = False
        self.scratch = scratch / f"slot-{index}"
        self.held: list[Delivery] = []  # received, not yet settled (extended while held)
        self.unstarted: list[Claim] = []  # claimed with the rest of a batch, not yet run
        self.pending: list[Finished] = []
        self.pending_since = 0.0
        self.prefetch = 1
        self.failed = False  # an attempt of the current batch failed
        self.idle = False


class Agent:
    def __init__(
        self,
        *,
        queue: WorkQueue,
        store: Store,
        events: EventBus,
        config: AgentConfig,
        clock: Clock = SYSTEM_CLOCK,
        ledger: Ledger | None = None,
    ):
        self.queue = queue
        self.store = store
        self.events = events
        self.config = config
        self.clock = clock
        self.ledger = ledger if ledger is not None else make_ledger(queue, store, events, clock)
        self._stopping = _Flag()
        self._lock = threading.Condition()
        self._manifests: dict[str, tuple[Manifest | None, float]] = {}
        # run -> (times its manifest could not be read, the current back-off, until when)
        self._broken: dict[str, tuple[int, float, float]] = {}
        self._health: dict[str, tuple[int, int]] = {}  # run -> (successes, failures) here
        self._bundles: dict[str, UnpackedBundle] = {}
        self._executors: dict[str, Executor | ContainerExecutor] = {}
        self._last_bundle: str | None = None
        self._setup_lock = threading.Lock()
        self.completed = 0  # attempts finished (any outcome), for tests and reports
        self._last_finished = float("-inf")
        self._slots: list[_Slot] = []
        self._announced_idle = False
        self._exit_reason: str | None = None
        root = store.local_path("")
        # Outputs are sealed by a rename into the store: keep scratch on the store's disk.
        # (and apart from what else lives in the worker's scratch, such as its own log).
        self._scratch = (
            (root / "scratch" / _safe(config.name)) if root else config.scratch / "slots"
        )

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful stop: no new work; running attempts are preempted.

        Safe in a signal handler, even one that interrupts itself (two SIGTERMs in a row): it
        only sets a flag, taking no lock.
        """
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set() or self._exit_reason is not None

    def run(self) -> str:
        """Work until stopped, idle past the timeout, or (burst) out of work; says which."""
        was_reaper = reaper.is_subreaper()
        reaper.become_subreaper()  # orphans of a task come back to us, to be killed
        self._exit_reason = None
        self._announced_idle = False
        self._lifetime(stopped=False)
        self._last_finished = self.clock.monotonic()
        SPARE_HOSTS.start(self.config.slots)  # interpreters start while we wait for work
        slots = self._slots = [_Slot(i, self._scratch) for i in range(self.config.slots)]
        for slot in slots:
            slot.prefetch = max(self.config.first_prefetch, 1)
        threads = [
            threading.Thread(target=self._slot_loop, args=(s,), name=f"slot-{s.index}")
            for s in slots[1:]
        ]
        for thread in threads:
            thread.start()
        try:
            self._slot_loop(slots[0])
        finally:
            if self._exit_reason is None:
                self._stopping.set()
            for thread in threads:
                thread.join()
            for executor in self._executors.values():  # every task process winds down at once
                executor.begin_close()
            SPARE_HOSTS.begin_close()
            for executor in self._executors.values():
                executor.close()
            SPARE_HOSTS.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
        reason = self._exit_reason or "stopped"
        self._emit(EventKind.STOPPED, detail=reason)
        self._lifetime(stopped=True)
        reaper.become_subreaper(was_reaper)  # an agent run inside another program leaves it be
        return reason

    def _slot_loop(self, slot: _Slot) -> None:
        cfg = self.config
        # A local receive is a cheap query: wait in short pieces, so a stop is seen at once.
        poll = min(cfg.poll_seconds, LOCAL_POLL) if self.ledger.batches else cfg.poll_seconds
        while not self.stopping:
            try:
                deliveries = self.queue.receive(slot.prefetch, poll, worker=cfg.name)
            except DiskFull as exc:
                log.error("%s", exc)
                self.clock.sleep(DISK_FULL_PAUSE)
                continue
            if not deliveries:
                if self._idle(slot):
                    return
                continue
            self._active(slot)
            slot.held = list(deliveries)
            slot.unstarted = self._claim_all(slot, deliveries)
            durations: list[float] = []
            ahead = self._start_ahead(slot) if len(slot.unstarted) > 1 else {}
            while slot.unstarted and not self.stopping:
                claim = slot.unstarted.pop(0)
                self._pace(claim.manifest.run_id)
                began = time.perf_counter()
                self._attempt_safely(slot, claim, ahead.pop(id(claim), None))
                durations.append(time.perf_counter() - began)
                self._maybe_flush(slot)
            for prepared in ahead.values():  # stopping: what is queued in the host goes too
                if prepared.task is not None:
                    prepared.task.stop(self.config.preempt_grace)
            self._give_back(slot)
            self._flush(slot, force=True)
            self._adapt(slot, durations, len(deliveries))
        self._give_back(slot)
        self._flush(slot, force=True)

    def _adapt(self, slot: _Slot, durations: list[float], got: int) -> None:
        """Receive more at once while shards are short, succeed and the queue keeps up; one
        while they are long or failing."""
        if slot.failed:
            slot.prefetch, slot.failed = 1, False
        elif durations and max(durations) < FAST_SHARD and got >= slot.prefetch:
            slot.prefetch = min(slot.prefetch * 2, MAX_PREFETCH)
        elif not durations or max(durations) >= 10 * FAST_SHARD:
            slot.prefetch = 1

    def _active(self, slot: _Slot) -> None:
        with self._lock:
            slot.idle = False
            self._announced_idle = False

    def _idle(self, slot: _Slot) -> bool:
        """Nothing received: announce idleness once all slots are idle; True to end this slot."""
        cfg = self.config
        with self._lock:
            slot.idle = True
            if not all(s.idle for s in self._slots):
                return self._exit_reason is not None
            announce = not self._announced_idle
            self._announced_idle = True
            idle_for = self.clock.monotonic() - self._last_finished
            if cfg.burst:
                self._exit_reason = self._exit_reason or "queue empty"
            elif cfg.idle_timeout is not None and idle_for >= cfg.idle_timeout:
                self._exit_reason = self._exit_reason or f"idle for {idle_for:.0f}s"
        if announce:
            self._emit(EventKind.IDLE)
            self._trim_executors()
            self._lifetime(stopped=False)
        return self._exit_reason is not None

    def _give_back(self, slot: _Slot) -> None:
        """Return received messages this slot did not get to (stopping): not a delivery. A
        claimed attempt that never started is recorded preempted, so no claim stays running."""
        for claim in slot.unstarted:
            self._settle(
                slot,
                self._finished(
                    claim,
                    _Outcome(AttemptState.PREEMPTED, None, "worker stopped before it started"),
                ),
            )
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

    def _release(self, slot: _Slot, delivery: Delivery) -> None:
        with contextlib.suppress(ValueError):
            slot.held.remove(delivery)

    # -- settling --------------------------------------------------------------------------

    def _maybe_flush(self, slot: _Slot) -> None:
        if slot.pending and (
            len(slot.pending) >= SETTLE_BATCH
            or time.monotonic() - slot.pending_since >= SETTLE_AGE
            or not self.ledger.batches
        ):
            self._flush(slot, force=True)

    def _flush(self, slot: _Slot, *, force: bool) -> None:
        while slot.pending:
            try:
                self.ledger.settle(slot.pending)
            except DiskFull as exc:
                if self._stopping.is_set():
                    log.error("%s; %d attempts stay unsettled", exc, len(slot.pending))
                    slot.pending = []
                    return
                log.error("%s", exc)
                self.clock.sleep(DISK_FULL_PAUSE)
                self.ledger.extend([f.delivery for f in slot.pending], self.config.lease_seconds)
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
                self._last_finished = self.clock.monotonic()
            slot.pending = []

    def _settle(self, slot: _Slot, finished: Finished) -> None:
        self._release(slot, finished.delivery)
        if not slot.pending:
            slot.pending_since = time.monotonic()
        slot.pending.append(finished)
        run_id = finished.delivery.message.run_id
        good, bad = self._health.get(run_id, (0, 0))
        if finished.state is AttemptState.FAILED:
            slot.failed = True
            self._health[run_id] = (good, bad + 1)
            self._flush(slot, force=True)  # the runner's halt rule wants to hear of it now
        elif finished.state is AttemptState.SUCCEEDED:
            self._health[run_id] = (good + 1, bad)

    def _pace(self, run_id: str) -> None:
        """Until a run has had a success here, each failure waits a little longer before the
        next attempt: a task that cannot work gives the runner time to halt the run (--halt)
        before it burns every shard's attempts, and costs a working task nothing."""
        good, bad = self._health.get(run_id, (0, 0))
        if good == 0 and bad:
            pause = min(FAILING_PACE[0] * 2 ** (bad - 1), FAILING_PACE[1])
            deadline = self.clock.monotonic() + pause
            while not self._stopping.is_set() and self.clock.monotonic() < deadline:
                self.clock.sleep(min(0.05, deadline - self.clock.monotonic()))

    # -- one attempt -----------------------------------------------------------------------

    def _claim_all(self, slot: _Slot, deliveries: list[Delivery]) -> list[Claim]:
        """Vet every received message and claim attempts for those to run, in one go."""
        wanted: list[tuple[Delivery, Manifest, str, int]] = []
        for delivery in deliveries:
            try:
                vetted = self._vet(delivery)
            except Exception as exc:
                self._not_started(slot, delivery, exc)
                continue
            if vetted is None:
                self._release(slot, delivery)
            else:
                wanted.append((delivery, *vetted))
        if not wanted:
            return []
        try:
            numbers = self.ledger.claim_many(
                [
                    (d.message.run_id, d.message.shard_id, hint, bundle)
                    for d, _, bundle, hint in wanted
                ],
                worker=self.config.name,
            )
        except Exception as exc:
            for delivery, *_ in wanted:
                self._not_started(slot, delivery, exc)
            return []
        return [
            Claim(d, manifest, attempt, started, bundle)
            for (d, manifest, bundle, _), (attempt, started) in zip(wanted, numbers, strict=True)
        ]

    def _not_started(self, slot: _Slot, delivery: Delivery, exc: Exception) -> None:
        """A message could not even be claimed: give it back, later when waiting helps."""
        self._release(slot, delivery)
        if isinstance(exc, ManifestBroken):
            _, delay, _ = self._broken[delivery.message.run_id]
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

    def _attempt_safely(self, slot: _Slot, claim: Claim, prepared: _Prepared | None = None) -> None:
        try:
            self._attempt(slot, claim, prepared)
        except Exception as exc:  # after the claim: the attempt counts as failed
            shard_id = claim.delivery.message.shard_id
            log.exception("attempt of shard %s failed in the worker", shard_id)
            failed = _Outcome(AttemptState.FAILED, None, f"worker error: {exc}")
            self._settle(slot, self._finished(claim, failed))

    def _finished(
        self, claim: Claim, outcome: _Outcome, outputs: list[str] | None = None
    ) -> Finished:
        return Finished(
            delivery=claim.delivery,
            attempt=claim.attempt,
            started=claim.started,
            finished=self.clock.time(),
            state=outcome.state,
            worker=self.config.name,
            max_attempts=claim.manifest.run_options.max_attempts,
            exit_code=outcome.exit_code,
            reason=outcome.reason,
            outputs=outputs or [],
            bundle=claim.bundle,
        )

    def _start_ahead(self, slot: _Slot) -> dict[int, _Prepared]:
        """Short shards of one warm host: send them all at once, so the host never waits for
        the worker's bookkeeping between two of them (each keeps its own log and outputs)."""
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
        ahead: dict[int, _Prepared] = {}
        for position, claim in enumerate(claims):
            prepared = self._prepare(slot, claim, position)
            if prepared.executor is not None and not getattr(prepared.executor, "queues", False):
                return ahead  # the task does not import: one at a time shows why
            if prepared.early is None:
                self._launch(slot, prepared)
            ahead[id(claim)] = prepared
        return ahead

    def _attempt(self, slot: _Slot, claim: Claim, prepared: _Prepared | None = None) -> None:
        if prepared is None:
            prepared = self._prepare(slot, claim, 0)
        run_id, shard_id = claim.manifest.run_id, claim.delivery.message.shard_id
        try:
            outcome, reason_hint = self._run(slot, prepared)
            outputs = self._seal(run_id, shard_id, claim.attempt, prepared.out_dir)
            prepared.log.store()
        except Exception as exc:
            # The attempt is claimed: record it and count it, so a shard whose outputs cannot be
            # stored fails within its budget instead of looping until it is dead-lettered.
            log.exception("attempt %d of shard %s failed in the worker", claim.attempt, shard_id)
            error = _Outcome(AttemptState.FAILED, None, f"worker error: {exc}")
            outcome, reason_hint, outputs = error, None, []
            shutil.rmtree(prepared.out_dir, ignore_errors=True)
        if outcome.state is AttemptState.FAILED and reason_hint:
            outcome.reason = reason_hint
        self._settle(slot, self._finished(claim, outcome, outputs))

    def claim(self, delivery: Delivery) -> Claim | None:
        """Steps 1-2 for one message (the fleet simulator): drop it, or claim an attempt."""
        vetted = self._vet(delivery)
        if vetted is None:
            return None
        manifest, bundle, hint = vetted
        message = delivery.message
        ((attempt, started),) = self.ledger.claim_many(
            [(message.run_id, message.shard_id, hint, bundle)], worker=self.config.name
        )
        return Claim(delivery, manifest, attempt, started, bundle)

    def _vet(self, delivery: Delivery) -> tuple[Manifest, str, int] | None:
        """Drop (ack) a message of an unknown or cancelled run or of a shard already
        committed; else the manifest, the bundle to run and the first attempt number to try."""
        message = delivery.message
        run_id, shard_id = message.run_id, message.shard_id
        manifest = self._manifest(run_id)
        if manifest is None or manifest.state != RunState.ACTIVE.value:
            # A drop cannot be undone: make sure with a fresh read (a retried run is active again).
            manifest = self._manifest(run_id, fresh=True)
        if manifest is None or manifest.state != RunState.ACTIVE.value:
            log.info(
                "dropping shard %s of %s run %s",
                shard_id,
                "unknown" if manifest is None else manifest.state,
                run_id,
            )
            self.queue.ack(delivery)
            return None
        maybe_done = delivery.delivery_attempt > 1 or message.backup or message.preemptions
        if maybe_done and self.store.exists(Layout.result(run_id, shard_id)):
            self.queue.ack(delivery)  # committed by an attempt whose ack was lost, or backed up
            return None
        bundle = message.bundle or manifest.bundle
        hint = message.failures + message.preemptions + delivery.delivery_attempt
        return manifest, bundle, hint

    def settle(
        self,
        claim: Claim,
        state: AttemptState,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
        out_dir: Path | None = None,
    ) -> None:
        """Steps 4-5 for an attempt executed elsewhere (the fleet simulator): commit a success
        (first commit wins), then ack, retry or fail it."""
        run_id, shard_id = claim.manifest.run_id, claim.delivery.message.shard_id
        outputs = _files(out_dir) if out_dir is not None else []
        self.ledger.settle(
            [
                Finished(
                    delivery=claim.delivery,
                    attempt=claim.attempt,
                    started=claim.started,
                    finished=self.clock.time(),
                    state=state,
                    worker=self.config.name,
                    max_attempts=claim.manifest.run_options.max_attempts,
                    exit_code=exit_code,
                    reason=reason,
                    outputs=outputs,
                    bundle=claim.bundle,
                )
            ]
        )
        del run_id, shard_id

    def _prepare(self, slot: _Slot, claim: Claim, position: int) -> _Prepared:
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
        prepared = _Prepared(
            claim=claim,
            log=_Log(slot.scratch / f"log-{position}.txt", self.store, key),
            out_dir=slot.scratch / f"out-{position}",
        )
        try:
            prepared.executor = self._executor(claim.bundle, Entry(manifest.entry), options)
            staged = self._stage(shard, options.stage, slot.scratch / f"input-{position}")
        except (ImagePullError, ContainerRuntimeMissing, GpuSupportMissing) as exc:
            # Not this shard's fault: no shard of the run can start here. Stop the whole run
            # with the reason, instead of failing every shard's every attempt with it.
            self._halt_run(run_id, str(exc))
            with prepared.log.path.open("a") as fh:
                fh.write(f"cflow: {exc}\n")
            prepared.early = _Outcome(AttemptState.FAILED, reason=str(exc))
            return prepared
        except (CFlowError, OSError) as exc:
            with prepared.log.path.open("a") as fh:
                fh.write(f"cflow: {exc}\n")
            prepared.early = _Outcome(AttemptState.FAILED, reason=str(exc))
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

    def _launch(self, slot: _Slot, prepared: _Prepared) -> None:
        assert prepared.executor is not None and prepared.shard is not None
        prepared.task = prepared.executor.start(prepared.shard, prepared.log.path, slot=slot.index)

    def _run(self, slot: _Slot, prepared: _Prepared) -> tuple[_Outcome, str | None]:
        if prepared.early is not None:
            return prepared.early, None
        if prepared.task is None:
            self._launch(slot, prepared)
        assert prepared.task is not None
        outcome = self._supervise(slot, prepared.claim, prepared.task, prepared.log)
        if getattr(prepared.task, "not_started", False) and not self._stopping.is_set():
            # The host died under an earlier shard of the batch: this one never ran. Run it.
            self._launch(slot, prepared)
            outcome = self._supervise(slot, prepared.claim, prepared.task, prepared.log)
        hint = prepared.task.reason
        if hint is None and outcome.state is AttemptState.FAILED:
            hint = _last_line(prepared.log.path)
        return outcome, hint

    def _supervise(
        self, slot: _Slot, claim: Claim, task: RunningTask, attempt_log: _Log
    ) -> _Outcome:
        cfg, clock = self.config, self.clock
        manifest = claim.manifest
        timeout = manifest.run_options.timeout
        start = clock.monotonic()
        last_beat = last_upload = start
        code = task.wait(_FIRST_WAIT)
        if code is None and slot.pending:  # a longer shard: settle the finished ones first
            self._flush(slot, force=True)
        while True:
            if code is not None:
                if code == 0:
                    return _Outcome(AttemptState.SUCCEEDED, 0)
                if self._stopping.is_set() and (code < 0 or getattr(task, "not_started", False)):
                    return _Outcome(AttemptState.PREEMPTED, code, "worker stopped (preemption)")
                return _Outcome(AttemptState.FAILED, code, _describe_exit(code))
            now = clock.monotonic()
            if self._stopping.is_set():
                code = task.stop(cfg.preempt_grace)
                return _Outcome(AttemptState.PREEMPTED, code, "worker stopped (preemption)")
            if now - start >= timeout:
                code = task.stop(cfg.preempt_grace)
                return _Outcome(AttemptState.FAILED, code, f"timed out after {timeout:g}s")
            if now - last_beat >= cfg.heartbeat:
                last_beat = now
                self.ledger.extend(slot.held, cfg.lease_seconds)
                self._emit(
                    EventKind.HEARTBEAT,
                    run_id=manifest.run_id,
                    shard_id=claim.delivery.message.shard_id,
                    attempt=claim.attempt,
                )
                current = self._manifest(manifest.run_id)
                if current is not None and current.state == RunState.CANCELLED.value:
                    code = task.stop(cfg.preempt_grace)
                    return _Outcome(AttemptState.FAILED, code, CANCELLED)
            if now - last_upload >= min(cfg.log_upload_seconds, _SHOW_LOG):
                last_upload = now
                attempt_log.show()
            code = task.wait(_STEP)

    # -- outputs and logs ------------------------------------------------------------------

    def _seal(self, run_id: str, shard_id: str, attempt: int, out_dir: Path) -> list[str]:
        """Move the attempt's outputs out of the task's reach, into its prefix, read-only.

        Every process of the attempt is gone by now (the executor saw to it); what a process
        we could not see might still hold open is the scratch copy, never the stored one. An
        output folder left empty is kept for the next attempt (no folder churn per shard).
        """
        try:
            with os.scandir(out_dir) as entries:
                if next(entries, None) is None:
                    return []
        except FileNotFoundError:
            return []
        outputs = _files(out_dir)
        if not outputs:
            shutil.rmtree(out_dir, ignore_errors=True)
            return []
        prefix = Layout.outputs(run_id, shard_id, attempt)
        target = self.store.local_path(prefix)
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(out_dir, target)
            except OSError:  # another disk, or a leftover target: copy instead
                shutil.copytree(out_dir, target, dirs_exist_ok=True)
                shutil.rmtree(out_dir, ignore_errors=True)
            _read_only(target)
            return outputs
        for rel in outputs:
            self.store.put_file(prefix + rel, out_dir / rel)
        shutil.rmtree(out_dir, ignore_errors=True)
        return outputs

    # -- helpers ---------------------------------------------------------------------------

    def _manifest(self, run_id: str, *, fresh: bool = False) -> Manifest | None:
        now = self.clock.monotonic()
        broken = self._broken.get(run_id)
        if broken is not None and now < broken[2]:  # read again only once the back-off is over
            raise ManifestBroken(f"the manifest of run {run_id} cannot be read", run_id=run_id)
        cached = self._manifests.get(run_id)
        if not fresh and cached is not None and now - cached[1] < self.config.manifest_ttl:
            return cached[0]
        key = Layout.manifest(run_id)
        try:
            raw = self.store.get(key)
        except NotFound:
            manifest = None
        else:
            try:
                manifest = Manifest.from_json(raw)
            except (ValueError, TypeError, KeyError) as exc:
                self._manifests.pop(run_id, None)
                count = (broken[0] if broken else 0) + 1
                delay = min(BROKEN_BACKOFF[0] * 2 ** (count - 1), BROKEN_BACKOFF[1])
                self._broken[run_id] = (count, delay, now + delay)
                raise ManifestBroken(
                    f"the manifest {self.store.url(key)} of run {run_id} cannot be read ({exc})",
                    run_id=run_id,
                ) from None
        self._broken.pop(run_id, None)
        self._manifests[run_id] = (manifest, now)
        return manifest

    def _halt_run(self, run_id: str, reason: str) -> None:
        """Cancel a run that cannot run on any worker (its image cannot be pulled, its GPUs
        cannot be passed into a container), saying why:
        the runner's watch ends at once and prints the reason, as for ``--halt``."""
        key = Layout.manifest(run_id)
        try:
            current = Manifest.from_json(self.store.get(key))
        except (NotFound, ValueError, TypeError):
            return
        if current.state != RunState.ACTIVE.value:
            return
        halted = dataclasses.replace(current, state=RunState.CANCELLED.value, halted=reason)
        self.store.put(key, halted.to_json())
        self._manifests[run_id] = (halted, self.clock.monotonic())
        log.error("run %s stopped: %s", run_id, reason)

    def _trim_executors(self) -> None:
        """With nothing running, close the task hosts of every bundle but the last one used:
        a long-lived VM serving many versions of a task keeps one imported copy, not all."""
        with self._setup_lock:
            for sha in [sha for sha in self._executors if sha != self._last_bundle]:
                self._executors.pop(sha).close()

    def _executor(
        self, sha: str, entry: Entry, options: RunOptions
    ) -> Executor | ContainerExecutor:
        image, timeout, isolate = options.image, options.timeout, options.isolate
        gpu = options.gpu is not None
        # A container executor also carries the run's timeout (its backstop) and GPUs.
        key = f"{sha}:{int(isolate)}"
        if image is not None:
            key += f" {image} {timeout:g} gpu={int(gpu)}"
        with self._setup_lock:
            self._last_bundle = key
            executor = self._executors.get(key)
            if executor is None:
                bundle = self._bundles.get(sha)
                if bundle is None:
                    try:
                        data = self.store.get(Layout.bundle(sha))
                    except NotFound:
                        raise TaskError(f"task bundle {sha[:12]} is missing") from None
                    bundle = unpack(data, sha, self.config.scratch / "bundles")
                    self._bundles[sha] = bundle
                if image is None:
                    executor = Executor(bundle, entry, isolate=isolate or None)
                else:  # raises ContainerRuntimeMissing, ImagePullError, GpuSupportMissing
                    executor = ContainerExecutor(
                        bundle, entry, image, timeout=timeout, isolate=isolate, gpu=gpu
                    )
                self._executors[key] = executor
            return executor

    def _stage(self, shard: Shard, stage: bool, work: Path) -> str | None:
        if not shard.input:
            return None
        if "://" not in shard.input:
            if not Path(shard.input).exists():
                raise TaskError(f"input {shard.input} does not exist on worker {self.config.name}")
            return shard.input
        if not stage:
            return shard.input
        name = shard.input.rstrip("/").rsplit("/", 1)[-1] or "input"
        target = work / name
        shutil.rmtree(target.parent, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.store.fetch(shard.input, target)
        return str(target)

    def _emit(self, kind: EventKind, **fields: object) -> None:
        self.ledger.emit(Event(kind=kind.value, worker=self.config.name, **fields))  # type: ignore[arg-type]

    def _lifetime(self, *, stopped: bool) -> None:
        """``fleet/<worker>/lifetime.json``: when this worker started, was last seen and
        stopped, for the run report's billed time."""
        now = self.clock.time()
        if not hasattr(self, "_started_at"):
            self._started_at = now
        record = {
            "worker": self.config.name,
            "started_at": self._started_at,
            "last_seen": now,
            "stopped_at": now if stopped else None,
            "machine_type": os.environ.get("CFLOW_MACHINE_TYPE") or None,
        }
        try:
            self.store.put(
                f"fleet/{_safe(self.config.name)}/lifetime.json",
                json.dumps(record, sort_keys=True).encode(),
            )
        except (BackendError, OSError):
            log.warning("could not record this worker's lifetime", exc_info=True)


def make_ledger(queue: WorkQueue, store: Store, events: EventBus, clock: Clock) -> Ledger:
    """The embedded backend settles in SQLite transactions; every other one call at a time."""
    from worker.backends.local.queue import LocalEvents, LocalQueue
    from worker.backends.local.store import LocalStore

    if (
        isinstance(queue, LocalQueue)
        and isinstance(store, LocalStore)
        and isinstance(events, LocalEvents)
        and Path(queue.db.path).resolve() == (store.root / "queue.db")
    ):
        from worker.backends.local.ledger import LocalLedger

        return LocalLedger(queue=queue, store=store, events=events, clock=clock)
    return Ledger(queue=queue, store=store, events=events, clock=clock)


def _files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _read_only(folder: Path) -> None:
    """Sealed files are 0444. Folders stay writable, so a user can still delete a run with
    ``rm -r``; what could have rewritten them (the attempt's processes) is gone."""
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(path.lstat().st_mode):
                path.chmod(0o444)


def _last_line(path: Path, limit: int = 4096) -> str | None:
    """The log's last non-empty line that is not the worker's own note: the error a user sees."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(size - limit, 0))
            tail = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line and not line.startswith("cflow: the task's process"):
            return line[:500]
    return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "worker"


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"
