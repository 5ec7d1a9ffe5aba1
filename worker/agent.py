"""The worker agent: receive a shard, run it, store its outputs and log, commit, ack.

One loop per worker, one thread per slot. For each delivery:

1. look up the run's manifest (cached); drop messages of unknown or cancelled runs;
2. **claim** an attempt number create-only (its ``status.json`` says ``running``);
3. unpack the task bundle (once per hash), stage the input, start the task in its own process
   group, extend the lease and upload the log while it runs;
4. on success upload outputs and **commit** ``result.json`` create-only: the first attempt wins,
   a later duplicate is recorded ``discarded``; on failure re-publish the shard with one more
   failure, or mark it failed when the budget is used; then **ack**.

On SIGTERM (how a Spot preemption starts) the agent stops receiving, stops its tasks, uploads
their partial logs, records them ``preempted`` and nacks them so they run elsewhere at once;
preemptions never count against ``max_attempts``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from worker import defaults
from worker.bundle import UnpackedBundle, unpack
from worker.clock import SYSTEM_CLOCK, Clock
from worker.container import ContainerExecutor
from worker.errors import CFlowError, NotFound, TaskError
from worker.executor import Executor, RunningTask
from worker.protocol import (
    AttemptState,
    Entry,
    Event,
    EventKind,
    Layout,
    Manifest,
    RunState,
    Shard,
    ShardFailure,
    ShardResult,
)
from worker.queue import Delivery, EventBus, WorkQueue
from worker.store import Store
from worker.taskapi import TaskShard

log = logging.getLogger("cflow.worker")

_STEP = 0.2  # seconds between checks while a task runs (stop requests, deadlines)


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


class Agent:
    def __init__(
        self,
        *,
        queue: WorkQueue,
        store: Store,
        events: EventBus,
        config: AgentConfig,
        clock: Clock = SYSTEM_CLOCK,
    ):
        self.queue = queue
        self.store = store
        self.events = events
        self.config = config
        self.clock = clock
        self._stopping = threading.Event()
        self._lock = threading.Condition()
        self._busy = 0
        self._manifests: dict[str, tuple[Manifest | None, float]] = {}
        self._bundles: dict[str, UnpackedBundle] = {}
        self._executors: dict[str, Executor | ContainerExecutor] = {}
        self._last_bundle: str | None = None
        self._setup_lock = threading.Lock()
        self.completed = 0  # attempts finished (any outcome), for tests and reports
        self._last_finished = float("-inf")

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful stop: no new work; running attempts are preempted."""
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> str:
        """Work until stopped, idle past the timeout, or (burst) out of work; says which."""
        cfg = self.config
        last_active = self.clock.monotonic()
        announced_idle = False
        reason = "stopped"
        with ThreadPoolExecutor(cfg.slots, thread_name_prefix="slot") as pool:
            while not self.stopping:
                with self._lock:
                    while self._busy >= cfg.slots and not self.stopping:
                        self._lock.wait(0.5)
                    free = cfg.slots - self._busy
                if self.stopping:
                    break
                deliveries = self.queue.receive(free, cfg.poll_seconds)
                if deliveries:
                    with self._lock:
                        self._busy += len(deliveries)
                    for delivery in deliveries:
                        pool.submit(self._attempt_safely, delivery)
                    announced_idle = False
                    continue
                with self._lock:
                    busy = self._busy
                    last_active = max(last_active, self._last_finished)
                if busy:
                    continue
                if not announced_idle:
                    self._emit(EventKind.IDLE)
                    announced_idle = True
                    self._trim_executors()
                if cfg.burst:
                    reason = "queue empty"
                    break
                idle_for = self.clock.monotonic() - last_active
                if cfg.idle_timeout is not None and idle_for >= cfg.idle_timeout:
                    reason = f"idle for {idle_for:.0f}s"
                    break
        for executor in self._executors.values():
            executor.close()
        self._emit(EventKind.STOPPED, detail=reason)
        return reason

    def _attempt_safely(self, delivery: Delivery) -> None:
        try:
            self._attempt(delivery)
        except Exception as exc:  # the store or queue failed us: let the shard run again
            log.exception("attempt of shard %s failed inside the worker", delivery.message.shard_id)
            self._emit(
                EventKind.PREEMPTED,
                run_id=delivery.message.run_id,
                shard_id=delivery.message.shard_id,
                detail=f"worker error: {exc}",
            )
            try:
                self.queue.nack(delivery)
            except Exception:
                log.exception("nack failed; the lease will lapse instead")
        finally:
            with self._lock:
                self._busy -= 1
                self.completed += 1
                self._last_finished = self.clock.monotonic()  # idle time counts from here
                self._lock.notify_all()

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, delivery: Delivery) -> None:
        claim = self.claim(delivery)
        if claim is None:
            return
        manifest, attempt, started = claim.manifest, claim.attempt, claim.started
        run_id, shard = manifest.run_id, delivery.message.shard_record
        options = manifest.run_options

        prefix = Layout.attempt_prefix(run_id, shard.id, attempt)
        direct = self.store.local_path(prefix)
        work = (
            direct if direct is not None else self.config.scratch / run_id / shard.id / str(attempt)
        )
        log_path, out_dir = work / "log.txt", work / "out"
        try:
            outcome = self._execute(delivery, manifest, shard, attempt, work, log_path, out_dir)
            self._upload_log(run_id, shard.id, attempt, log_path)
            if outcome.state is AttemptState.SUCCEEDED:
                outcome = self._commit(run_id, shard.id, attempt, started, out_dir)
        except Exception as exc:
            # The attempt is claimed: record it and count it, so a shard whose outputs cannot be
            # stored fails within its budget instead of looping until it is dead-lettered.
            log.exception("attempt %d of shard %s failed inside the worker", attempt, shard.id)
            outcome = _Outcome(AttemptState.FAILED, None, f"worker error: {exc}")
        finally:
            if direct is None:
                shutil.rmtree(work, ignore_errors=True)
        self._finish(delivery, attempt, started, outcome, options.max_attempts)

    def claim(self, delivery: Delivery) -> Claim | None:
        """Steps 1-2: drop (ack) a message of an unknown or cancelled run or of a shard already
        committed, or claim the next attempt number and announce it started."""
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
        maybe_done = delivery.delivery_attempt > 1 or message.backup
        if maybe_done and self.store.exists(Layout.result(run_id, shard_id)):
            self.queue.ack(delivery)  # committed by an attempt whose ack was lost, or backed up
            return None
        attempt, started = self._claim(
            run_id, shard_id, message.failures + delivery.delivery_attempt
        )
        self._emit(EventKind.STARTED, run_id=run_id, shard_id=shard_id, attempt=attempt)
        return Claim(delivery, manifest, attempt, started)

    def settle(
        self,
        claim: Claim,
        state: AttemptState,
        *,
        exit_code: int | None = None,
        reason: str | None = None,
        out_dir: Path | None = None,
    ) -> None:
        """Step 4 for an attempt executed elsewhere (the fleet simulator): commit a success
        (first commit wins), then ack, retry or fail it as :meth:`_attempt` does."""
        run_id, shard_id = claim.manifest.run_id, claim.delivery.message.shard_id
        if out_dir is None:
            out_dir = self.config.scratch / run_id / shard_id / str(claim.attempt) / "out"
        outcome = _Outcome(state, exit_code, reason)
        if state is AttemptState.SUCCEEDED:
            outcome = self._commit(run_id, shard_id, claim.attempt, claim.started, out_dir)
        max_attempts = claim.manifest.run_options.max_attempts
        self._finish(claim.delivery, claim.attempt, claim.started, outcome, max_attempts)

    def _execute(
        self,
        delivery: Delivery,
        manifest: Manifest,
        shard: Shard,
        attempt: int,
        work: Path,
        log_path: Path,
        out_dir: Path,
    ) -> _Outcome:
        options = manifest.run_options
        work.mkdir(parents=True, exist_ok=True)
        try:
            executor = self._executor(manifest)
            staged = self._stage(shard, options.stage, work)
        except (CFlowError, OSError) as exc:
            log_path.write_text(f"cflow: {exc}\n")
            return _Outcome(AttemptState.FAILED, reason=str(exc))
        task_shard = TaskShard(
            run_id=manifest.run_id,
            id=shard.id,
            index=shard.index,
            attempt=attempt,
            input=staged,
            output_dir=out_dir,
            params=shard.params or {},
        )
        task = executor.start(task_shard, log_path)
        return self._supervise(delivery, task, manifest, shard.id, attempt, log_path)

    def _supervise(
        self,
        delivery: Delivery,
        task: RunningTask,
        manifest: Manifest,
        shard_id: str,
        attempt: int,
        log_path: Path,
    ) -> _Outcome:
        cfg, clock = self.config, self.clock
        timeout = manifest.run_options.timeout
        start = clock.monotonic()
        last_beat = last_upload = start
        while True:
            code = task.wait(_STEP)
            if code is not None:
                if code == 0:
                    return _Outcome(AttemptState.SUCCEEDED, 0)
                return _Outcome(AttemptState.FAILED, code, _describe_exit(code))
            now = clock.monotonic()
            if self.stopping:
                code = task.stop(cfg.preempt_grace)
                return _Outcome(AttemptState.PREEMPTED, code, "worker stopped (preemption)")
            if now - start >= timeout:
                code = task.stop(cfg.preempt_grace)
                return _Outcome(AttemptState.FAILED, code, f"timed out after {timeout:g}s")
            if now - last_beat >= cfg.heartbeat:
                last_beat = now
                self.queue.extend(delivery, cfg.lease_seconds)
                current = self._manifest(manifest.run_id)
                if current is not None and current.state == RunState.CANCELLED.value:
                    code = task.stop(cfg.preempt_grace)
                    return _Outcome(AttemptState.FAILED, code, "run cancelled")
            if now - last_upload >= cfg.log_upload_seconds:
                last_upload = now
                self._upload_log(manifest.run_id, shard_id, attempt, log_path)

    def _commit(
        self, run_id: str, shard_id: str, attempt: int, started: float, out_dir: Path
    ) -> _Outcome:
        out_prefix = Layout.outputs(run_id, shard_id, attempt)
        outputs = (
            sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
            if out_dir.is_dir()
            else []
        )
        if self.store.local_path(out_prefix) is None:
            for rel in outputs:
                self.store.put_file(out_prefix + rel, out_dir / rel)
        result = ShardResult(
            run_id=run_id,
            shard_id=shard_id,
            attempt=attempt,
            worker=self.config.name,
            started_at=started,
            finished_at=self.clock.time(),
            outputs=outputs,
        )
        if self.store.create(Layout.result(run_id, shard_id), result.to_json()):
            return _Outcome(AttemptState.SUCCEEDED, 0)
        return _Outcome(AttemptState.DISCARDED, 0, "another attempt committed first")

    def _finish(
        self, delivery: Delivery, attempt: int, started: float, outcome: _Outcome, max_attempts: int
    ) -> None:
        message = delivery.message
        run_id, shard_id = message.run_id, message.shard_id
        if outcome.state is not AttemptState.SUCCEEDED:  # a winner's record is its result.json
            self._write_status(run_id, shard_id, attempt, started, outcome)
        kind = EventKind.SUCCEEDED
        if outcome.state is AttemptState.PREEMPTED:
            self.queue.nack(delivery)
            kind = EventKind.PREEMPTED
        elif outcome.state is AttemptState.FAILED and outcome.reason == "run cancelled":
            self.queue.ack(delivery)
            kind = EventKind.FAILED
        elif outcome.state is AttemptState.FAILED:
            failures = message.failures + 1
            if failures >= max_attempts:
                failure = ShardFailure(
                    run_id=run_id,
                    shard_id=shard_id,
                    attempt=attempt,
                    failures=failures,
                    exit_code=outcome.exit_code,
                    reason=outcome.reason or "failed",
                )
                self.store.put(Layout.failure(run_id, shard_id), failure.to_json())
                kind = EventKind.FAILED
            else:
                # Publish the next try before acking this one: a crash in between duplicates
                # the shard (harmless, first commit wins) instead of losing it.
                self.queue.publish([dataclasses.replace(message, failures=failures)])
                kind = EventKind.RETRYING
            self.queue.ack(delivery)
        else:
            self.queue.ack(delivery)
        self._emit(
            kind,
            run_id=run_id,
            shard_id=shard_id,
            attempt=attempt,
            exit_code=outcome.exit_code,
            detail=outcome.reason,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _claim(self, run_id: str, shard_id: str, hint: int) -> tuple[int, float]:
        """Take the first free attempt number at or after ``hint`` (create-only status)."""
        attempt = max(hint, 1)
        while True:
            started = self.clock.time()
            status = self._status(
                run_id, shard_id, attempt, started, _Outcome(AttemptState.RUNNING)
            )
            if self.store.create(Layout.status(run_id, shard_id, attempt), status):
                return attempt, started
            attempt += 1

    def _status(
        self, run_id: str, shard_id: str, attempt: int, started: float, outcome: _Outcome
    ) -> bytes:
        from worker.protocol import AttemptStatus

        finished = None if outcome.state is AttemptState.RUNNING else self.clock.time()
        return AttemptStatus(
            run_id=run_id,
            shard_id=shard_id,
            attempt=attempt,
            state=outcome.state.value,
            worker=self.config.name,
            started_at=started,
            finished_at=finished,
            exit_code=outcome.exit_code,
            reason=outcome.reason,
        ).to_json()

    def _write_status(
        self, run_id: str, shard_id: str, attempt: int, started: float, outcome: _Outcome
    ) -> None:
        data = self._status(run_id, shard_id, attempt, started, outcome)
        self.store.put(Layout.status(run_id, shard_id, attempt), data)

    def _upload_log(self, run_id: str, shard_id: str, attempt: int, log_path: Path) -> None:
        key = Layout.log(run_id, shard_id, attempt)
        if self.store.local_path(key) is None and log_path.is_file():
            self.store.put_file(key, log_path)

    def _manifest(self, run_id: str, *, fresh: bool = False) -> Manifest | None:
        now = self.clock.monotonic()
        cached = self._manifests.get(run_id)
        if not fresh and cached is not None and now - cached[1] < self.config.manifest_ttl:
            return cached[0]
        try:
            manifest: Manifest | None = Manifest.from_json(self.store.get(Layout.manifest(run_id)))
        except NotFound:
            manifest = None
        self._manifests[run_id] = (manifest, now)
        return manifest

    def _trim_executors(self) -> None:
        """With nothing running, close the task hosts of every bundle but the last one used:
        a long-lived VM serving many versions of a task keeps one imported copy, not all."""
        with self._setup_lock:
            for sha in [sha for sha in self._executors if sha != self._last_bundle]:
                self._executors.pop(sha).close()

    def _executor(self, manifest: Manifest) -> Executor | ContainerExecutor:
        image, timeout = manifest.run_options.image, manifest.run_options.timeout
        # A container executor also carries the run's timeout (its backstop): key by both.
        key = manifest.bundle if image is None else f"{manifest.bundle} {image} {timeout:g}"
        with self._setup_lock:
            self._last_bundle = key
            executor = self._executors.get(key)
            if executor is None:
                bundle = self._bundles.get(manifest.bundle)
                if bundle is None:
                    try:
                        data = self.store.get(Layout.bundle(manifest.bundle))
                    except NotFound:
                        raise TaskError(f"task bundle {manifest.bundle[:12]} is missing") from None
                    bundle = unpack(data, manifest.bundle, self.config.scratch / "bundles")
                    self._bundles[manifest.bundle] = bundle
                if image is None:
                    executor = Executor(bundle, Entry(manifest.entry))
                else:  # raises ContainerRuntimeMissing / ImagePullError for the whole run
                    executor = ContainerExecutor(
                        bundle, Entry(manifest.entry), image, timeout=timeout
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
        target = work / "input" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        self.store.fetch(shard.input, target)
        return str(target)

    def _emit(self, kind: EventKind, **fields: object) -> None:
        try:
            self.events.publish(Event(kind=kind.value, worker=self.config.name, **fields))  # type: ignore[arg-type]
        except Exception:  # events are advisory; the store is the truth
            log.warning("could not publish %s event", kind.value, exc_info=True)


def _describe_exit(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with code {code}"
