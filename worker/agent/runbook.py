"""What a worker knows of each run: its manifest (cached), whether it can be read, how it fares.

A message is vetted against its run before any attempt is claimed: a run that is unknown or
cancelled, a shard already committed, or a message left over from before the run's last retry,
is dropped; a run whose manifest cannot be read is backed off from, longer each time, instead of
burning the shard's deliveries.

How a run fares is counted per *round*: the run as submitted, then each ``runner retry`` (with
the same task or a new one) starts a round of its own, and the attempts of an earlier round or
of another bundle never count toward the current one. Until a round has had a success here,
each failure paces the next attempt; and the run's ``--halt`` rule
(:class:`~worker.agent.halt_rule.HaltRule`, recorded in its options) is judged on this worker's
own attempts too, so it holds with no runner watching (``--detach``, Ctrl-C).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass
from itertools import islice

from worker.agent.caller import gone
from worker.agent.halt_rule import HaltTally, run_rule
from worker.agent.slot import StopFlag
from worker.clock import Clock
from worker.errors import CFlowError, NotFound
from worker.ledger import CANCELLED
from worker.protocol import AttemptState, Layout, Manifest, RunState
from worker.queue import Delivery
from worker.store import Store

log = logging.getLogger("cflow.worker")

BROKEN_BACKOFF = (2.0, 120.0)  # seconds: redelivery delay for a run whose manifest is broken
FAILING_PACE = (0.05, 2.0)  # seconds: first and longest pause after failures with no success

Round = tuple[str, int]  # a run's bundle and how many retries it has had


class ManifestBroken(CFlowError):
    """A run's ``run.json`` cannot be read; ``delay``: seconds before it is read again."""

    def __init__(self, message: str, *, run_id: str, delay: float):
        super().__init__(message, run_id=run_id)
        self.delay = delay


def run_round(manifest: Manifest) -> Round:
    """The round a run is in: its bundle, and how many retries it has had."""
    return manifest.bundle, max(len(manifest.bundles) - 1, 0)


@dataclass
class _Health:
    """One round of a run on this worker: its successes and failures, and the rule's tally."""

    round: Round
    tally: HaltTally
    good: int = 0
    bad: int = 0


@dataclass(frozen=True)
class Vetted:
    """A message worth an attempt: its run's manifest, the bundle to run, the first attempt
    number to try."""

    manifest: Manifest
    bundle: str
    hint: int


class RunBook:
    """Each run's manifest as last read, the back-off of unreadable ones, and the successes and
    failures of the current round of its attempts on this worker."""

    def __init__(self, store: Store, clock: Clock, ttl: float, stop: StopFlag):
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self._stop = stop
        self._manifests: dict[str, tuple[Manifest | None, float]] = {}
        # run -> (times its manifest could not be read, the current back-off, until when)
        self._broken: dict[str, tuple[int, float, float]] = {}
        self._health: dict[str, _Health] = {}
        self._lock = threading.Lock()  # the slots record and judge at once

    def manifest(self, run_id: str, *, fresh: bool = False) -> Manifest | None:
        """The run's manifest (None: no such run), read again once ``ttl`` has passed.

        Raises:
            ManifestBroken: it cannot be read, now or during the back-off of the last failure.
        """
        now = self.clock.monotonic()
        broken = self._broken.get(run_id)
        if broken is not None and now < broken[2]:  # read again only once the back-off is over
            raise ManifestBroken(
                f"the manifest of run {run_id} cannot be read", run_id=run_id, delay=broken[1]
            )
        cached = self._manifests.get(run_id)
        if not fresh and cached is not None and now - cached[1] < self.ttl:
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
                    delay=delay,
                ) from None
        self._broken.pop(run_id, None)
        if manifest is not None and manifest.state == RunState.ACTIVE.value:
            manifest = self._unless_orphaned(manifest)
        self._manifests[run_id] = (manifest, now)
        return manifest

    def _unless_orphaned(self, manifest: Manifest) -> Manifest:
        """The run, halted if the process it is bound to is gone (:mod:`worker.agent.caller`):
        its Ctrl-C would have cancelled it, and nobody reads what it goes on to make. One
        whose every shard committed is left for whoever attaches to finish."""
        run_id = manifest.run_id
        pid = gone(manifest.options.get("caller"))
        if pid is None:
            return manifest
        if not manifest.publishing:
            results = self.store.list(Layout.shards_prefix(run_id), suffix="/result.json")
            if len(list(islice(results, manifest.shard_count))) >= manifest.shard_count:
                return manifest
        reason = f"the process that made it (pid {pid}) ended without waiting for it"
        self.halt(run_id, reason, cut=True)  # the items it was reading died with it
        return self._manifests.get(run_id, (manifest, 0.0))[0] or manifest

    def look_after(self, run_id: str) -> None:
        """Read the run's manifest afresh (a worker leaving it idle): halted if its caller is
        gone, rather than left active with no worker and nobody watching."""
        with contextlib.suppress(CFlowError):
            self.manifest(run_id, fresh=True)

    def vet(self, delivery: Delivery) -> Vetted | None:
        """What to run for a message; None when it is to be dropped (acked): its run is unknown
        or cancelled, its shard already committed, or it names a bundle the run no longer runs
        (left on the queue from before the run's last retry, which queued the shard again)."""
        message = delivery.message
        run_id, shard_id = message.run_id, message.shard_id
        manifest = self.manifest(run_id)
        stale = manifest is not None and (
            message.bundle not in (None, manifest.bundle) or message.round > run_round(manifest)[1]
        )
        if manifest is None or manifest.state != RunState.ACTIVE.value or stale:
            # A drop cannot be undone, and a retry's message may be newer than the cached
            # manifest: make sure with a fresh read (a retried run is active again).
            manifest = self.manifest(run_id, fresh=True)
        if manifest is None or manifest.state != RunState.ACTIVE.value:
            log.info(
                "dropping shard %s of %s run %s",
                shard_id,
                "unknown" if manifest is None else manifest.state,
                run_id,
            )
            return None
        if message.bundle not in (None, manifest.bundle):
            log.info(
                "dropping shard %s of run %s: queued before its last retry, for bundle %s",
                shard_id,
                run_id,
                message.bundle,
            )
            return None
        # A retried run may hold two messages of a shard where the queue cannot drop a run's
        # messages (Pub/Sub): one left from before the retry, and the retry's own.
        maybe_done = (
            delivery.delivery_attempt > 1
            or message.backup
            or message.preemptions
            or run_round(manifest)[1] > 0
        )
        if maybe_done and self.store.exists(Layout.result(run_id, shard_id)):
            return None  # committed by an attempt whose ack was lost, or backed up, or twice queued
        self._enter(manifest)
        hint = message.failures + message.preemptions + delivery.delivery_attempt
        return Vetted(manifest, manifest.bundle, hint)

    def _enter(self, manifest: Manifest) -> None:
        """Count this worker's attempts of the run toward its current round from now on."""
        current = run_round(manifest)
        with self._lock:
            health = self._health.get(manifest.run_id)
            if health is None or health.round != current:
                self._health[manifest.run_id] = _Health(current, HaltTally(run_rule(manifest)))

    def halt(
        self, run_id: str, reason: str, *, in_round: Round | None = None, cut: bool = False
    ) -> bool:
        """Cancel a run that cannot run, saying why (the runner's watch ends at once and prints
        the reason, as for ``--halt``): its image cannot be pulled, its GPUs cannot be passed
        into a container, or its halt rule is met here. ``in_round``: only if the run is still
        in that round (a retry since starts afresh); ``cut``: a run still being published holds
        the shards out so far (its caller, reading its items, is gone). True if this call
        stopped the run."""
        seen: list[Manifest] = []

        def stop(raw: bytes) -> bytes | None:  # asked again if another writer came between
            seen[:] = [current := Manifest.from_json(raw)]
            if current.state != RunState.ACTIVE.value or (
                in_round is not None and run_round(current) != in_round
            ):
                return None
            off, now = RunState.CANCELLED.value, self.clock.time()
            halted = dataclasses.replace(current, state=off, halted=reason, cancelled_at=now)
            if cut and current.publishing:  # its items will never be read on: it holds those out
                halted = dataclasses.replace(halted, shard_count=current.published or 0)
            seen[:] = [halted]
            return seen[0].to_json()

        try:
            written = self.store.update(Layout.manifest(run_id), stop)
        except (NotFound, ValueError, TypeError):
            return False
        if seen:
            self._manifests[run_id] = (seen[0], self.clock.monotonic())
        if written is None:
            return False
        log.error("run %s stopped: %s", run_id, reason)
        return True

    def superseded(self, run_id: str, bundle: str) -> bool:
        """Whether a running attempt of the run, running ``bundle``, is to stop: the run was
        cancelled (or halted), or retried since with another task (the retry queued its shard
        again). Read afresh, at each heartbeat: a cancel followed at once by a retry must not
        go unseen behind the cache, or the old code would commit in the new round."""
        try:
            current = self.manifest(run_id, fresh=True)
        except Exception as exc:  # unreadable for now: look again at the next heartbeat
            log.warning("%s", exc)
            return False
        return (
            current is None or current.state == RunState.CANCELLED.value or current.bundle != bundle
        )

    def record(
        self,
        run_id: str,
        state: AttemptState,
        *,
        bundle: str | None = None,
        reason: str | None = None,
        exit_code: int | None = None,
    ) -> None:
        """Count an ended attempt of the run (that ran ``bundle``) toward its current round
        here, and halt the run when that meets its rule."""
        success = state is AttemptState.SUCCEEDED
        if not success and (state is not AttemptState.FAILED or reason == CANCELLED):
            return  # preempted, or stopped by a cancel: not the task's doing
        with self._lock:
            health = self._health.get(run_id)
            if health is None or (bundle is not None and bundle != health.round[0]):
                return  # an attempt of another round's code
            if success:
                health.good += 1
                health.tally.success()
                return
            health.bad += 1
            verdict = health.tally.failure(reason, exit_code)
        if verdict is not None and self._unanswered(run_id, health):
            self.halt(run_id, verdict, in_round=health.round)

    def _unanswered(self, run_id: str, health: _Health) -> bool:
        """Whether no shard of the run has committed in this round, on any worker: the rule
        judged on this worker's attempts alone must not stop a run that works elsewhere."""
        if health.tally.rule.mode != "same":
            return True  # now,fail=N counts failures whatever succeeded
        manifest = self.manifest(run_id, fresh=True)
        if manifest is None or run_round(manifest) != health.round:
            return False
        # A retry queued again every shard not committed then: more commits than that, and
        # one of this round's shards committed.
        before = (
            manifest.shard_count - int(manifest.bundles[-1]["shards"]) if manifest.bundles else 0
        )
        results = self.store.list(Layout.shards_prefix(run_id), suffix="/result.json")
        return len(list(islice(results, before + 1))) <= before

    def pace(self, run_id: str) -> None:
        """Until the run's round has had a success here, each failure waits a little longer
        before the next attempt: a task that cannot work gives the halt rule time to stop the
        run before it burns every shard's attempts, and costs a working task nothing."""
        health = self._health.get(run_id)
        if health is None or health.good or not health.bad:
            return
        pause = min(FAILING_PACE[0] * 2 ** (health.bad - 1), FAILING_PACE[1])
        deadline = self.clock.monotonic() + pause
        while not self._stop.is_set() and self.clock.monotonic() < deadline:
            self.clock.sleep(min(0.05, deadline - self.clock.monotonic()))
