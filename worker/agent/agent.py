"""The worker agent: receive shards, run them, seal their outputs, commit, ack.

One loop per slot (the first in the calling thread: one slot, no thread hand-offs). A slot
receives a few messages at once when shards are short, and for each:

1. looks up the run's manifest (cached); drops messages of unknown or cancelled runs, and backs
   off from a run whose manifest cannot be read (:mod:`worker.agent.runbook`);
2. **claims** an attempt number create-only and announces it started
   (:mod:`worker.agent.books`);
3. runs the task (:mod:`worker.executors.process`: a warm Python process per slot, or bash),
   extending the leases it holds, uploading the log and watching for cancellation while it runs
   (:mod:`worker.agent.attempt`);
4. when the attempt ends, every process it started is gone; its outputs are **sealed** (moved
   out of the task's reach into the attempt's prefix, read-only) before anything is committed
   (:mod:`worker.agent.files`);
5. **settles** it through the :mod:`worker.ledger`: commit (first attempt wins), retry or fail,
   ack, event. Locally a batch of settlements is one durable transaction.

On SIGTERM (how a Spot preemption starts) the agent stops receiving, stops its tasks, records
them ``preempted`` and gives them back at the front of the queue; a preemption never counts as a
failure or as a delivery.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker import defaults
from worker.agent.attempt import AttemptRunner
from worker.agent.books import DISK_FULL_PAUSE, Bookkeeper, Outcome
from worker.agent.files import list_files
from worker.agent.idleness import IdleWords
from worker.agent.lifetime import Lifetime, safe_name
from worker.agent.pool import ExecutorPool
from worker.agent.runbook import RunBook
from worker.agent.scratch import ScratchInUse, ScratchLock
from worker.agent.slot import Claim, Slot, StopFlag
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import DiskFull
from worker.executors import reaper
from worker.executors.host_client import SPARE_HOSTS
from worker.ledger import Ledger
from worker.protocol import AttemptState, EventKind
from worker.queue import Delivery, EventBus, WorkQueue
from worker.store import Store

log = logging.getLogger("cflow.worker")

LOCAL_POLL = 0.02  # seconds a local receive waits before the loop looks at stop requests


@dataclass(frozen=True)
class AgentConfig:
    """How one worker runs: its name, scratch folder, slots, and its timings (seconds)."""

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
    run: str | None = None  # the one run it serves (a local worker), named in its lifetime record


class Agent:
    """A worker: one receive loop per slot, until stopped, idle or (burst) out of work.

    ``ledger`` is how attempts are claimed and settled (the backend's, e.g. the local one that
    settles a batch in one transaction); by default one call at a time on ``queue``, ``store``
    and ``events``.
    """

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
        if ledger is None:
            ledger = Ledger(queue=queue, store=store, events=events, clock=clock)
        self._stopping = StopFlag()
        self._looked = 0.0  # when it last looked at its one run's caller while idle
        self._exit_reason: str | None = None
        root = store.local_path("")
        # Outputs are sealed by a rename into the store: keep scratch on the store's disk.
        # (and apart from what else lives in the worker's scratch, such as its own log).
        self._scratch = (
            (root / "scratch" / safe_name(config.name)) if root else config.scratch / "slots"
        )
        self.runs = RunBook(store, clock, config.manifest_ttl, self._stopping)
        self.books = Bookkeeper(
            queue=queue,
            ledger=ledger,
            runs=self.runs,
            clock=clock,
            worker=config.name,
            lease_seconds=config.lease_seconds,
            stop=self._stopping,
        )
        self.pool = ExecutorPool(store, config.scratch / "bundles")
        self.attempts = AttemptRunner(
            store=store,
            runs=self.runs,
            books=self.books,
            pool=self.pool,
            clock=clock,
            stop=self._stopping,
            worker=config.name,
            preempt_grace=config.preempt_grace,
            heartbeat=config.heartbeat,
            log_upload_seconds=config.log_upload_seconds,
        )
        self.lifetime = Lifetime(store, clock, config.name, run=config.run)
        self.words = IdleWords(
            clock,
            config.heartbeat,
            lambda: self.books.emit(EventKind.IDLE),
            holds_empty=queue.holds_empty_receives,
        )

    @property
    def ledger(self) -> Ledger:
        """How this agent claims and settles attempts."""
        return self.books.ledger

    @property
    def completed(self) -> int:
        """Attempts settled so far (any outcome), for tests and reports."""
        return self.books.completed

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful stop: no new work; running attempts are preempted.

        Safe in a signal handler, even one that interrupts itself (two SIGTERMs in a row): it
        sets a flag and interrupts the queue's receives (:meth:`WorkQueue.interrupt`), taking
        no lock.
        """
        self._stopping.set()
        self.queue.interrupt()

    @property
    def stopping(self) -> bool:
        """Whether the agent was asked to stop or has decided to exit."""
        return self._stopping.is_set() or self._exit_reason is not None

    def run(self) -> str:
        """Work until stopped, idle past the timeout, or (burst) out of work; says which.
        Not at all while another live worker holds its scratch folder (its name, locally)."""
        lock = ScratchLock(self._scratch)
        try:
            lock.take()
        except ScratchInUse as exc:
            log.error("%s", exc)
            return "its name is in use"
        was_reaper = reaper.is_subreaper()
        reaper.become_subreaper()  # orphans of a task come back to us, to be killed
        self._exit_reason = None
        self.lifetime.record(stopped=False)
        self.books.last_finished = self._looked = self.clock.monotonic()
        SPARE_HOSTS.start(self.config.slots)  # interpreters start while we wait for work
        slots = self.words.slots = [Slot(i, self._scratch) for i in range(self.config.slots)]
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
            self.pool.begin_close()  # every task process winds down at once
            SPARE_HOSTS.begin_close()
            self.pool.close()
            SPARE_HOSTS.close()
            shutil.rmtree(self._scratch, ignore_errors=True)
            lock.release()
        reason = self._exit_reason or "stopped"
        self.books.emit(EventKind.STOPPED, detail=reason)
        self.lifetime.record(stopped=True)
        reaper.become_subreaper(was_reaper)  # an agent run inside another program leaves it be
        return reason

    def _slot_loop(self, slot: Slot) -> None:
        cfg, books, attempts = self.config, self.books, self.attempts
        # A local receive is a cheap query: wait in short pieces, so a stop is seen at once.
        poll = min(cfg.poll_seconds, LOCAL_POLL) if self.ledger.batches else cfg.poll_seconds
        try:
            while not self.stopping:
                deliveries = self._next_batch(slot, poll)
                if deliveries is None:
                    return
                if not deliveries:
                    continue
                self.words.active(slot)
                slot.held = list(deliveries)
                slot.unstarted = books.claim_all(slot, deliveries)
                durations: list[float] = []
                # The last batch's settlements (a durable commit) are made once this batch is
                # in its task host: the commit and the host's work overlap.
                early = len(slot.unstarted) > 1 or bool(slot.pending)
                ahead = attempts.start_ahead(slot) if early and slot.unstarted else {}
                books.flush(slot)
                while slot.unstarted and not self.stopping:
                    claim = slot.unstarted.pop(0)
                    self.runs.pace(claim.manifest.run_id)
                    began = time.perf_counter()
                    attempts.attempt_safely(slot, claim, ahead.pop(id(claim), None))
                    durations.append(time.perf_counter() - began)
                    books.maybe_flush(slot)
                attempts.stop_ahead(ahead)  # stopping: what is queued in the host goes too
                books.give_back(slot)
                slot.adapt(durations, len(deliveries))
        finally:
            books.flush(slot)  # what ended is settled before the slot does

    def _next_batch(self, slot: Slot, poll: float) -> list[Delivery] | None:
        """The next messages for ``slot`` (empty: none yet; None: the slot ends). With the
        last batch's settlements still pending, only a look that does not wait: where it finds
        nothing they are settled at once, before any wait (or idleness) begins."""
        if slot.pending:
            try:
                deliveries = self.queue.receive(slot.prefetch, 0.0, worker=self.config.name)
            except DiskFull:
                deliveries = []
            if not deliveries:
                self.books.flush(slot)
            return deliveries
        waiting = self.words.while_held(slot)
        try:
            deliveries = self.queue.receive(slot.prefetch, poll, worker=self.config.name)
        except DiskFull as exc:
            log.error("%s", exc)
            self.clock.sleep(DISK_FULL_PAUSE)
            return []
        finally:
            if waiting is not None:
                waiting.cancel()
        if not deliveries and self._idle(slot):
            return None
        return deliveries

    def _idle(self, slot: Slot) -> bool:
        """Nothing received: announce idleness once all slots are idle; True to end this slot."""
        cfg, leaving = self.config, False
        self.words.say(slot)
        with self.words.lock:
            settle = self.words.settled_now()
            if settle is None:  # another slot works
                return self._exit_reason is not None
            idle_for = self.clock.monotonic() - self.books.last_finished
            if cfg.burst:
                self._exit_reason = self._exit_reason or "queue empty"
            elif cfg.idle_timeout is not None and idle_for >= cfg.idle_timeout:
                self._exit_reason = self._exit_reason or f"idle for {idle_for:.0f}s"
                leaving = True
        now = self.clock.monotonic()
        if cfg.run is not None and (leaving or now - self._looked >= defaults.CANCEL_CHECK_SECONDS):
            self._looked = now  # its one run, halted if its caller went while no work came
            self.runs.look_after(cfg.run)
        if settle:  # the first empty receive since it worked: what it kept for work goes
            self.pool.trim()
            self.lifetime.record(stopped=False)
        return self._exit_reason is not None

    # -- an attempt run elsewhere (the fleet simulator) ------------------------------------

    def claim(self, delivery: Delivery) -> Claim | None:
        """Steps 1-2 for one message (the fleet simulator): drop it, or claim an attempt."""
        return self.books.claim(delivery)

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
        outputs = list_files(out_dir) if out_dir is not None else []
        finished = self.books.finished(claim, Outcome(state, exit_code, reason), outputs)
        self.books.settle_now(finished)
