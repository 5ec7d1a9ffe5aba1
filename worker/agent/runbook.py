"""What a worker knows of each run: its manifest (cached), whether it can be read, how it fares.

A message is vetted against its run before any attempt is claimed: a run that is unknown or
cancelled, or a shard already committed, is dropped; a run whose manifest cannot be read is
backed off from, longer each time, instead of burning the shard's deliveries.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from worker.agent.slot import StopFlag
from worker.clock import Clock
from worker.errors import CFlowError, NotFound
from worker.protocol import AttemptState, Layout, Manifest, RunState
from worker.queue import Delivery
from worker.store import Store

log = logging.getLogger("cflow.worker")

BROKEN_BACKOFF = (2.0, 120.0)  # seconds: redelivery delay for a run whose manifest is broken
FAILING_PACE = (0.05, 2.0)  # seconds: first and longest pause after failures with no success


class ManifestBroken(CFlowError):
    """A run's ``run.json`` cannot be read; ``delay``: seconds before it is read again."""

    def __init__(self, message: str, *, run_id: str, delay: float):
        super().__init__(message, run_id=run_id)
        self.delay = delay


@dataclass(frozen=True)
class Vetted:
    """A message worth an attempt: its run's manifest, the bundle to run, the first attempt
    number to try."""

    manifest: Manifest
    bundle: str
    hint: int


class RunBook:
    """Each run's manifest as last read, the back-off of unreadable ones, and the successes and
    failures of its attempts on this worker."""

    def __init__(self, store: Store, clock: Clock, ttl: float, stop: StopFlag):
        self.store = store
        self.clock = clock
        self.ttl = ttl
        self._stop = stop
        self._manifests: dict[str, tuple[Manifest | None, float]] = {}
        # run -> (times its manifest could not be read, the current back-off, until when)
        self._broken: dict[str, tuple[int, float, float]] = {}
        self._health: dict[str, tuple[int, int]] = {}  # run -> (successes, failures) here

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
        self._manifests[run_id] = (manifest, now)
        return manifest

    def vet(self, delivery: Delivery) -> Vetted | None:
        """What to run for a message; None when it is to be dropped (acked): its run is unknown
        or cancelled, or its shard already committed."""
        message = delivery.message
        run_id, shard_id = message.run_id, message.shard_id
        manifest = self.manifest(run_id)
        if manifest is None or manifest.state != RunState.ACTIVE.value:
            # A drop cannot be undone: make sure with a fresh read (a retried run is active again).
            manifest = self.manifest(run_id, fresh=True)
        if manifest is None or manifest.state != RunState.ACTIVE.value:
            log.info(
                "dropping shard %s of %s run %s",
                shard_id,
                "unknown" if manifest is None else manifest.state,
                run_id,
            )
            return None
        maybe_done = delivery.delivery_attempt > 1 or message.backup or message.preemptions
        if maybe_done and self.store.exists(Layout.result(run_id, shard_id)):
            return None  # committed by an attempt whose ack was lost, or backed up
        bundle = message.bundle or manifest.bundle
        hint = message.failures + message.preemptions + delivery.delivery_attempt
        return Vetted(manifest, bundle, hint)

    def halt(self, run_id: str, reason: str) -> None:
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

    def record(self, run_id: str, state: AttemptState) -> None:
        """Count an ended attempt of the run toward its successes or failures here."""
        good, bad = self._health.get(run_id, (0, 0))
        if state is AttemptState.FAILED:
            self._health[run_id] = (good, bad + 1)
        elif state is AttemptState.SUCCEEDED:
            self._health[run_id] = (good + 1, bad)

    def pace(self, run_id: str) -> None:
        """Until a run has had a success here, each failure waits a little longer before the
        next attempt: a task that cannot work gives the runner time to halt the run (--halt)
        before it burns every shard's attempts, and costs a working task nothing."""
        good, bad = self._health.get(run_id, (0, 0))
        if good == 0 and bad:
            pause = min(FAILING_PACE[0] * 2 ** (bad - 1), FAILING_PACE[1])
            deadline = self.clock.monotonic() + pause
            while not self._stop.is_set() and self.clock.monotonic() < deadline:
                self.clock.sleep(min(0.05, deadline - self.clock.monotonic()))
