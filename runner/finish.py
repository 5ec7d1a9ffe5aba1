"""Watch a run to its end and finish it: halt on a rule, combine the outputs, let the workers go.

The library half of ``runner submit``, ``watch`` and ``retry``: nothing here prints or picks an
exit code. Narration goes through a ``say`` callback (one line each, without a prefix), the live
progress display is the caller's :data:`Display`, and the end of a run comes back as an
:class:`Outcome`; errors are :class:`~worker.errors.CFlowError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from runner.engine import rounds, runs
from runner.engine.cache import cached_count, resumed
from runner.engine.deployment import Deployment
from runner.engine.halt import HaltJudge
from runner.engine.reports import ShardReport, iter_shard_reports
from runner.engine.watch import Snapshot, Watcher
from runner.results.combine import combine_run
from runner.results.parts import Combined, OnWorkers, OutTarget, Say
from worker import defaults
from worker.agent.halt_rule import HaltRule
from worker.errors import CFlowError
from worker.protocol import (
    AttemptState,
    AttemptStatus,
    Event,
    Layout,
    Manifest,
    RunState,
    ShardState,
)
from worker.store import Store

if TYPE_CHECKING:
    from worker.queue import EventBus

Display = Callable[[Watcher, float], Snapshot]  # (watcher, poll seconds) -> the last snapshot


def quiet(message: str) -> None:
    """A ``say`` that says nothing."""


def plain_watch(watcher: Watcher, poll_seconds: float) -> Snapshot:
    """A :data:`Display` that shows nothing: watch to the end."""
    return watcher.watch(poll_seconds=poll_seconds)


class Ending(StrEnum):
    """How the watching of a run ended."""

    SETTLED = "settled"  # every shard succeeded or failed; the outputs were combined (or not)
    CANCELLED = "cancelled"  # cancelled elsewhere (`runner cancel`), or by Ctrl-C when asked to
    HALTED = "halted"  # the halt rule stopped it
    DETACHED = "detached"  # Ctrl-C: the runner let go; the run goes on


@dataclass
class Outcome:
    """The end of a watched run, as data: what a caller shows and which exit it takes."""

    run_id: str
    ending: Ending
    snapshot: Snapshot | None = None  # the last look at the run (None: Ctrl-C came first)
    interrupted: bool = False  # the ending came from Ctrl-C
    halted: str | None = None  # why the halt rule stopped the run
    # SETTLED only: the combined files (URLs; None when the combine failed), copies written
    # elsewhere (--out), the failed shards' records, and why the combine failed.
    files: list[str] | None = None
    written: list[str] = field(default_factory=list)
    failed: list[ShardReport] = field(default_factory=list)
    combine_error: CFlowError | None = None
    # DETACHED while its shards were being published: (published, of how many); the rest
    # are published by the next `runner watch` (nothing else does)
    unpublished: tuple[int, int] | None = None

    @property
    def ok(self) -> bool:
        """Every shard succeeded and was combined, or the runner detached on purpose."""
        if self.ending is Ending.DETACHED:
            return True
        return (
            self.ending is Ending.SETTLED
            and self.combine_error is None
            and self.snapshot is not None
            and not self.snapshot.failed
        )


def run_events(dep: Deployment, manifest: Manifest) -> EventBus:
    """The run's own event stream, from a little before the run was made, or from its last
    retry (the rounds before it are over)."""
    since = float(manifest.bundles[-1]["at"]) if manifest.bundles else manifest.created_at - 5
    return dep.run_events(manifest.run_id, since=since)


def listen_first(dep: Deployment, run_id: str) -> EventBus:
    """The event stream of a run (or a round of it) about to be published, from now: opened
    before anything of it goes out, as Pub/Sub delivers to a subscription only what is
    published once it exists, and a worker already up takes a shard (and says so) the moment
    it is published."""
    return dep.run_events(run_id, since=time.time())


def make_watcher(
    dep: Deployment,
    manifest: Manifest,
    *,
    workers: int | None,
    slots: int | None,
    shards: int,
    idle_timeout: float | None = None,
    events: EventBus | None = None,
) -> Watcher:
    """A watcher sized as the run was submitted, unless told otherwise. ``events``: the run's
    event stream, opened before its shards were published (:func:`listen_first`)."""
    options = manifest.run_options
    slots = slots or options.slots
    return Watcher(
        manifest=manifest,
        store=dep.backends.store,
        queue=dep.backends.queue,
        events=events if events is not None else run_events(dep, manifest),
        fleet=dep.fleet(slots=slots, idle_timeout=idle_timeout, run_id=manifest.run_id),
        max_workers=min(workers or options.workers or dep.default_workers, shards),
        slots=slots,
        speculate=options.speculate,
        expect_heartbeats=True,  # this version's workers send them during long attempts
        quiet_poll_seconds=dep.quiet_poll_seconds,
        cached=cached_count(dep.backends.store, manifest.run_id),
    )


def live_workers(dep: Deployment, run_id: str) -> tuple[set[str], dict[str, str] | None]:
    """The fleet's instance names and the run's lease holders (None where unknown).

    A shaped run's workers are VMs of its own groups (``runner.backends.gcp.shapes.apply``), not of
    the deployment's: those are the ones listed.
    """
    fleets = [dep.fleet()]
    if not dep.config.is_local:
        from runner.backends.gcp.shapes.apply import run_group_fleets

        options = runs.load_manifest(dep.backends.store, run_id).run_options
        fleets = run_group_fleets(dep, options) or fleets
    names: set[str] = set()
    try:
        for fleet in fleets:
            names |= {i.name for i in fleet.instances()}
    finally:
        for fleet in fleets:
            fleet.close()
    return names, dep.backends.queue.leases(run_id)


def worker_gone(dep: Deployment, run_id: str, shard_id: str, attempt: int) -> str | None:
    """The worker of a running attempt, if it is gone (no instance of the fleet, no lease)."""
    try:
        status = AttemptStatus.from_json(
            dep.backends.store.get(Layout.status(run_id, shard_id, attempt))
        )
    except (CFlowError, ValueError, TypeError):
        return None
    if status.state != AttemptState.RUNNING.value:
        return None
    names, leases = live_workers(dep, run_id)
    if status.worker in names or (leases is not None and leases.get(shard_id) == status.worker):
        return None
    return status.worker


# Seconds `runner cancel` waits for the run's running attempts to stop: a worker looks at the
# run every few seconds, then its task gets SIGTERM and, after the grace, SIGKILL.
CANCEL_WAIT = defaults.CANCEL_CHECK_SECONDS + defaults.PREEMPT_GRACE + 3.0


@dataclass(frozen=True)
class Cancelled:
    """What a cancel did: queued shards dropped, and the attempts that were running (None
    where the queue does not say who holds what: Pub/Sub), of which ``still`` were running when
    the wait for them ran out."""

    run_id: str
    dropped: int
    running: int | None
    still: int = 0

    def describe(self) -> str:
        """One line: what was dropped and what became of the running attempts."""
        queued = f"{self.dropped} queued shards dropped" if self.dropped else "no shard queued"
        if self.running is None:
            queued = queued if self.dropped else "its workers drop its queued shards"
            running = (
                "each running attempt stops at its worker's next look at the run, every"
                f" {defaults.CANCEL_CHECK_SECONDS:g}s: SIGTERM, then SIGKILL after"
                f" {defaults.PREEMPT_GRACE:g}s"
            )
        elif not self.running:
            running = "no attempt was running"
        elif not self.still:
            running = f"its {self.running} running attempts stopped"
        else:
            running = (
                f"{self.still} of its {self.running} running attempts still stopping after"
                f" {CANCEL_WAIT:g}s; `runner status {self.run_id}` shows when they end"
            )
        return f"run {self.run_id} cancelled ({queued}; {running})"


def cancel_run(dep: Deployment, run_id: str, *, wait: float = CANCEL_WAIT) -> Cancelled:
    """Cancel a run, then wait (up to ``wait`` seconds) for its running attempts to stop,
    where the queue says who holds them (locally); none of them commits after the cancel."""
    queue = dep.backends.queue
    dropped = runs.cancel(dep.backends.store, queue, run_id)
    if queue.leases(run_id) is None:
        return Cancelled(run_id, dropped, None)

    def alive() -> set[str]:
        return live_workers(dep, run_id)[0]

    running = rounds.wait_released(queue, run_id, alive, timeout=0.0)
    still = rounds.wait_released(queue, run_id, alive, timeout=wait) if running else 0
    return Cancelled(run_id, dropped, running, still)


def resume_watching(
    dep: Deployment,
    manifest: Manifest,
    say: Say = quiet,
    *,
    workers: int | None = None,
    slots: int | None = None,
) -> Watcher:
    """A watcher of a run made earlier (``runner watch``, ``cflow.attach``): its events opened
    first, then what an interrupted submit left unpublished published."""
    events = run_events(dep, manifest)
    manifest = resume_publishing(dep, manifest, say)
    return make_watcher(
        dep, manifest, workers=workers, slots=slots, shards=manifest.shard_count, events=events
    )


def resume_publishing(dep: Deployment, manifest: Manifest, say: Say = quiet) -> Manifest:
    """Finish publishing a run whose submit was interrupted (re-sending the last unconfirmed
    batch is harmless: the first commit wins)."""
    if manifest.state != RunState.ACTIVE.value or not manifest.publishing:
        return manifest
    say(
        f"run {manifest.run_id} was interrupted while publishing"
        f" ({manifest.published} of {manifest.shard_count} shards); publishing the rest"
    )
    store = dep.backends.store  # a --cache submit's shards are still reused
    return runs.publish_rest(
        store, dep.backends.queue, manifest, reuse=resumed(store, manifest.run_id)
    )


def watch_and_finish(
    watcher: Watcher,
    dep: Deployment,
    *,
    rule: HaltRule,
    cancel_on_interrupt: bool,
    out: OutTarget | None,
    display: Display = plain_watch,
    on_outcome: Callable[[Outcome], None] | None = None,
    say: Say = quiet,
) -> Outcome:
    """Watch a run to its end (halting it on ``rule``), then combine its outputs.

    ``display`` watches and shows progress; ``on_outcome`` sees the outcome as soon as it is
    known, before the runner waits for the last workers to stop (a slow fleet never holds back
    the summary). Ctrl-C detaches, or cancels the run with ``cancel_on_interrupt``.
    """
    run_id = watcher.run_id
    store = dep.backends.store
    judge = HaltJudge.for_round(rule, watcher.manifest, store)

    def on_event(event: Event) -> None:
        note = judge.saw(event)
        if note is not None:
            runs.cancel(store, dep.backends.queue, run_id, halted=note)
            watcher.manifest = runs.load_manifest(store, run_id)

    watcher.on_event = on_event
    watcher.release.say = say  # what the drain waits for
    try:
        snapshot = display(watcher, dep.poll_seconds)
    except KeyboardInterrupt:
        if not cancel_on_interrupt:
            return _tell(_detached(store, run_id), on_outcome)
        runs.cancel(store, dep.backends.queue, run_id)
        watcher.drain_fleet()
        return _tell(Outcome(run_id, Ending.CANCELLED, interrupted=True), on_outcome)
    if snapshot.cancelled:
        watcher.drain_fleet()
        halted = runs.load_manifest(store, run_id).halted
        ending = Ending.HALTED if halted else Ending.CANCELLED
        return _tell(Outcome(run_id, ending, snapshot, halted=halted), on_outcome)
    # Every shard is settled: the workers stop while the outputs are combined.
    watcher.drain_fleet(wait=False)
    try:
        return _tell(_finish(dep, snapshot, out, say), on_outcome)
    finally:
        if not watcher.wait_drained():
            say("warning: some workers are still stopping")


def let_go(dep: Deployment, run_id: str, *, cancel: bool) -> Outcome:
    """Ctrl-C before the run is watched: the run goes on without this runner (its workers keep
    working and `runner watch` publishes what is left), or is cancelled with ``cancel``."""
    if not cancel:
        return _detached(dep.backends.store, run_id)
    runs.cancel(dep.backends.store, dep.backends.queue, run_id)
    return Outcome(run_id, Ending.CANCELLED, interrupted=True)


def _detached(store: Store, run_id: str) -> Outcome:
    """Ctrl-C let the run go: with how much of it was published, where that was cut short."""
    manifest = runs.load_manifest(store, run_id)
    cut = None
    if manifest.publishing:
        cut = (manifest.published or 0, manifest.shard_count)
    return Outcome(run_id, Ending.DETACHED, interrupted=True, unpublished=cut)


def _tell(outcome: Outcome, on_outcome: Callable[[Outcome], None] | None) -> Outcome:
    if on_outcome is not None:
        on_outcome(outcome)
    return outcome


def _finish(dep: Deployment, snapshot: Snapshot, out: OutTarget | None, say: Say) -> Outcome:
    """Mark a settled run finished and combine its outputs."""
    run_id = snapshot.run_id
    store = dep.backends.store
    # Every shard is settled, whatever the combine does.
    manifest = runs.update_manifest(store, run_id, lambda m: m.with_state(RunState.FINISHED))
    failed = (  # read every shard's records only when some failed
        [r for r in iter_shard_reports(store, manifest) if r.state is ShardState.FAILED]
        if snapshot.failed
        else []
    )
    outcome = Outcome(run_id, Ending.SETTLED, snapshot, failed=failed)
    try:
        combined = combine_where_data_is(dep, manifest, out=out, say=say)
    except CFlowError as exc:
        outcome.combine_error = exc
        return outcome
    outcome.files = [store.url(k) for k in combined.files]
    outcome.written = list(combined.written)
    return outcome


def combine_where_data_is(
    dep: Deployment,
    manifest: Manifest,
    *,
    out: OutTarget | None,
    headers: bool | None = None,
    say: Say = quiet,
    task: Path | None = None,
) -> Combined:
    """Combine where the data is: the deployment's combiner joins the parts where its store
    keeps them, and heavy copies are made by the deployment's workers (a helper run), not
    through this machine. ``task``: a task folder whose combine() and settings to follow
    instead of the run's own."""

    def warn(message: str) -> None:
        say(f"warning: {message}")

    workers = OnWorkers(
        queue=dep.backends.queue,
        listen=lambda helper_id: listen_first(dep, helper_id),
        make_watcher=lambda helper, n, events: make_watcher(
            dep, helper, workers=None, slots=None, shards=n, events=events
        ),
        poll_seconds=dep.poll_seconds,
        say=say,
    )
    return combine_run(
        dep.backends.store,
        manifest,
        out=out,
        headers=headers,
        warn=warn,
        combiner=dep.combiner,
        workers=workers,
        task=task,
    )
