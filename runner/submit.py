"""Submit a task over many shards: check it, bundle it, make the run, publish, start the fleet.

The library behind ``runner submit``; a test, a benchmark or a Python caller submits with
:func:`submit` and a :class:`SubmitRequest`, no command line needed. Narration goes through
``say`` (one line each, without a prefix), what a caller shows besides comes through the keyword
callbacks, errors are :class:`~worker.errors.CFlowError`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from runner.backends.factory import open_deployment
from runner.backends.gcp.shapes.model import check_shape_options, needs_groups
from runner.config import Config
from runner.engine import runs
from runner.engine.cache import ShardCache
from runner.engine.checks import CheckReport, check_task
from runner.engine.deployment import Deployment
from runner.engine.fingerprint import code_digest, task_env
from runner.engine.plan import BundleNote, describe_bundle
from runner.engine.stream import Publisher, start_stream
from runner.finish import (
    Display,
    Outcome,
    let_go,
    listen_first,
    make_watcher,
    plain_watch,
    quiet,
    watch_and_finish,
)
from runner.preflight import (
    check_writable,
    dry_run_plan,
    early_workers,
    narrate,
    start_early,
    undo_early,
)
from runner.request import SubmitRequest
from runner.results.parts import OutTarget, Say, check_out, outside_store
from worker.errors import ConfigError
from worker.executors.container.runtime import check_image
from worker.protocol import Layout, Manifest, RunOptions, Shard, new_run_id
from worker.tempdirs import temp_folder

if TYPE_CHECKING:
    from runner.backends.gcp.shapes.model import ShapedGroup
    from runner.engine.watch import Snapshot, Watcher
    from worker.queue import EventBus

Opener = Callable[[Config], Deployment]  # opens the deployment a Config describes


@dataclass
class Submitted:
    """What a submit did: the run it made (None: a dry run) and how it ended (None: not
    watched, it was detached or a dry run)."""

    run_id: str | None = None
    outcome: Outcome | None = None


def submit(
    request: SubmitRequest,
    config: Config,
    say: Say = quiet,
    *,
    opener: Opener = open_deployment,
    on_created: Callable[[Manifest], None] | None = None,
    on_published: Callable[[int], None] | None = None,
    display: Display = plain_watch,
    on_outcome: Callable[[Outcome], None] | None = None,
    listing: IO[str] | None = None,
) -> Submitted:
    """Check the task, make the run, publish its shards, start workers; watch and combine
    unless detached.

    Args:
        request: what to run and how.
        config: the backend to run on (``runner.config.resolve``).
        say: narration, one line at a time.
        opener: opens the deployment ``config`` describes, once the task has passed its check
            (a dry run opens one only to list remote inputs).
        on_created: called once the run exists, before publishing (an interrupted submit can
            be resumed from then on: show its id).
        on_published: the number of shards published so far, after each batch.
        display: watches the run to its end, showing progress (``runner.finish``).
        on_outcome: sees how the run ended as soon as that is known.
        listing: where a dry run writes its shards, one a line [default: stdout].

    Raises:
        CFlowError: the task, the options or the backend are not usable; nothing is published.
    """
    inputs = request.gather_inputs()  # every local input checked before anything starts
    if inputs is not None and inputs.remote and config.is_local:
        raise ConfigError(
            f"--inputs {inputs.remote[0]} is a Cloud Storage input; it needs the Google Cloud"
            " backend"
        )
    target = check_out(request.out, cloud=not config.is_local)
    if config.is_local:
        target = outside_store(config.store_dir, None, target)
    if target is not None and target.path is not None:
        check_writable(target.path, "--out")
    if config.is_local:
        check_writable(config.store_dir, "the store", "; pass --store DIR or set CFLOW_STORE")
    # The import check runs in its own interpreter while this one goes on (a short local run's
    # workers boot meanwhile); nothing is published before it has passed.
    checked = check_task(request.task_dir, code_checks=request.check, wait=False)
    try:
        bundle = describe_bundle(request.task_dir)
        if bundle.warning:
            say(f"warning: {bundle.warning}")
        # Nothing is made in the cloud for a task that cannot start.
        if request.dry_run or not config.is_local:
            narrate(checked, say)
        if request.dry_run:
            dry_run_plan(request, config, say, opener, listing or sys.stdout)
            return Submitted()
        store_was_there = config.is_local and config.store_dir.exists()
        dep = opener(config)
        flow: _Submission | None = None
        try:
            flow = _Submission(request, config, dep, say, checked, bundle)
            options = request.run_options(dep.default_workers)
            try:
                manifest = flow.create(options, store_was_there, on_created, on_published)
                return flow.follow(manifest, options, target, display, on_outcome)
            except KeyboardInterrupt:
                # Ctrl-C between the run's creation and its watch (which takes it itself) lets
                # go of the run as the watch would; with no run yet, or after the watch, it ends
                # the submit.
                if flow.created is None or flow.watched:
                    raise
                return flow.interrupted(flow.created, on_outcome)
        finally:
            if flow is not None and flow.publisher is not None:
                flow.publisher.join()  # a stream's publisher stops with its run
            dep.close()
    finally:
        if checked.probe is not None:  # the submit ended before it: stop the check
            checked.probe.cancel()


@dataclass
class _Submission:
    """One submit against an open deployment, step by step."""

    request: SubmitRequest
    config: Config
    dep: Deployment
    say: Say
    checked: CheckReport
    bundle: BundleNote
    shaped: list[ShapedGroup] = field(default_factory=list)
    publisher: Publisher | None = None  # a stream's, publishing while the run is watched
    cache: ShardCache | None = None  # --cache: the shards it reused
    created: Manifest | None = None  # the run, once it exists (before it is all published)
    events: EventBus | None = None  # the run's events, opened before it is published
    watched: bool = False  # the watch has begun: from then on it takes Ctrl-C itself

    def create(
        self,
        options: RunOptions,
        store_was_there: bool,
        on_created: Callable[[Manifest], None] | None,
        on_published: Callable[[int], None] | None,
    ) -> Manifest:
        """Check where the run goes, start early workers, bundle and make the run, publish."""
        request, config, dep = self.request, self.config, self.dep
        source = request.shard_source(dep.lister, self.say)
        cache = self.cache = _cache_for(request, config, dep, options) if request.cache else None
        if cache is not None:
            source = cache.keyed(source)
        self._check_placement(options)
        published = 0

        def made(manifest: Manifest) -> None:
            self.created = manifest
            if on_created is not None:
                on_created(manifest)

        def count(n: int) -> None:  # after each batch is recorded in the manifest
            nonlocal published
            published += n
            if cache is not None:
                cache.recorded()
            if on_published is not None:
                on_published(published)

        # The run's own workers (locally: started for it alone, in this process's environment)
        # boot while the run is made (their interpreter start is most of a short run's fixed
        # cost); VMs are sized once the shard count is known. With the cache, none start
        # before a shard is known to need running: starting interpreters would compete with
        # the reuse for this machine's cores, and a rerun that reuses every shard needs none.
        run_id = new_run_id()
        self.events = listen_first(dep, run_id)  # before a shard goes out
        fleet = dep.fleet(slots=request.slots, idle_timeout=request.idle_timeout, run_id=run_id)
        early = start_early(fleet, dep, early_workers(request, options.workers))
        try:
            narrate(self.checked, self.say)
        except BaseException:  # the task cannot start: take back what was started
            undo_early(fleet, early, config, store_was_there)
            raise
        fell_back = config.is_local and not request.local
        self.say(config.describe() + (" (no deployment found)" if fell_back else ""))
        staging: tempfile.TemporaryDirectory[str] | None = None
        try:
            bundled = request.task_dir
            if dep.prepare_task is not None:  # Google Cloud: requirements as wheels the VMs take
                staging = temp_folder("task")
                bundled = dep.prepare_task(request.task_dir, Path(staging.name))
            return self._make_run(bundled, source, options, run_id, made, count)
        except BaseException as exc:
            # Ctrl-C once the run exists lets go of it, like Ctrl-C while it is watched: its
            # workers go on and `runner watch` publishes the rest (submit decides what to say).
            if early and not (isinstance(exc, KeyboardInterrupt) and self.created is not None):
                fleet.delete(early)
            raise
        finally:
            if staging is not None:
                staging.cleanup()

    def _make_run(
        self,
        bundled: Path,
        source: Iterator[Shard],
        options: RunOptions,
        run_id: str,
        made: Callable[[Manifest], None],
        count: Callable[[int], None],
    ) -> Manifest:
        """Make the run from the bundled task folder and publish its shards: a stream's as
        they are read (its publisher goes on while the run is watched), else all of them."""
        dep, cache, feed = self.dep, self.cache, self.request.feed
        reuse = cache.reuse if cache is not None else None
        packed = self.bundle.packed if bundled == self.request.task_dir else None
        if feed is not None:
            manifest, self.publisher = start_stream(
                store=dep.backends.store,
                queue=dep.backends.queue,
                task_dir=bundled,
                feed=feed,
                options=options,
                on_created=made,
                on_published=count,
                run_id=run_id,
                keyed=cache.keyed if cache is not None else None,
                reuse=reuse,
                packed=packed,
            )
            return manifest
        return runs.create_run(
            store=dep.backends.store,
            queue=dep.backends.queue,
            task_dir=bundled,
            shards=source,
            options=options,
            stage_input=dep.stage_input,
            on_published=count,
            on_created=made,  # before publishing: an interrupted submit resumes
            run_id=run_id,
            reuse=reuse,
            packed=packed,
        )

    def interrupted(
        self, manifest: Manifest, on_outcome: Callable[[Outcome], None] | None
    ) -> Submitted:
        """Ctrl-C while the run was being made: let go of it (`runner watch` resumes it) or
        cancel it, as Ctrl-C while it is watched would."""
        outcome = let_go(self.dep, manifest.run_id, cancel=self.request.cancel_on_interrupt)
        if self.request.cancel_on_interrupt:  # its workers go, as after a cancelled watch
            shards = manifest.shard_count
            make_watcher(self.dep, manifest, workers=None, slots=None, shards=shards).drain_fleet()
        if on_outcome is not None:
            on_outcome(outcome)
        return Submitted(manifest.run_id, outcome)

    def _check_placement(self, options: RunOptions) -> None:
        """Shape, image and fleet size checked (and the run's groups made) before the run."""
        request, cloud = self.request, not self.config.is_local
        check_shape_options(options)  # bad shape options: one line, before anything
        if needs_groups(options, cloud=False) and not cloud:
            gpus = request.gpu and request.image
            gpus_note = " (the containers get this machine's GPUs)" if gpus else ""
            self.say(
                f"machine shape and --fallback apply to Google Cloud VMs; ignored here{gpus_note}"
            )
        if needs_groups(options) and cloud:  # checked in the zone, made, then publish
            from runner.backends.gcp.shapes.apply import apply_run_shape  # cloud runs only

            self.shaped = apply_run_shape(self.dep, options)
            for shaped in self.shaped:
                self.say(f"VMs from group {shaped.group} ({shaped.describe})")
        if request.image is not None and not cloud:  # the workers share this machine's images
            check_image(request.image, gpu=request.gpu is not None)
        if cloud:  # a group holds at most 1,000 (zonal) or 2,000 VMs: say so now
            from runner.backends.gcp.fleet import check_size  # the Compute client: cloud only

            check_size(options.workers, zonal=not self.config.region)

    def follow(
        self,
        manifest: Manifest,
        options: RunOptions,
        target: OutTarget | None,
        display: Display,
        on_outcome: Callable[[Outcome], None] | None,
    ) -> Submitted:
        """Start the workers; unless detached, watch the run to its end and combine."""
        request, dep, run_id = self.request, self.dep, manifest.run_id
        store = dep.backends.store
        max_workers = min(options.workers, manifest.shard_count)
        self.say(
            f"run {run_id}: {manifest.shard_count} shards, up to {max_workers} workers"
            f" x {request.slots} slots, {self.bundle.size_text} bundle; store"
            f" {store.url(Layout.run_prefix(run_id))}"
        )
        if self.cache is not None:
            self.say(f"cache: {self.cache.cached} of {manifest.shard_count} shards reused")
        watcher = make_watcher(
            dep,
            manifest,
            workers=request.workers,
            slots=request.slots,
            shards=manifest.shard_count,
            idle_timeout=request.idle_timeout,
            events=self.events,
        )
        watcher.max_workers = max_workers
        if self.cache is not None:
            cache = self.cache  # a stream's publisher may still be reusing: count as it goes
            watcher.cached = lambda: cache.cached
            watcher.reused = cache.take_reused
        if request.detach:
            # Starts the workers. Not listening: the run's events wait in its subscription for
            # `runner watch` (taken here, they would be gone; and a stream opened by a process
            # that ends at once is one the Pub/Sub emulator keeps handing events to).
            watcher.poll(listen=False)
            self.say(f"detached; follow with `runner watch {run_id}`")
            return Submitted(run_id)

        def watch(watching: Watcher, poll_seconds: float) -> Snapshot:
            self.watched = True  # inside the watch's own Ctrl-C handling
            return display(watching, poll_seconds)

        outcome = watch_and_finish(
            watcher,
            dep,
            rule=request.rule,
            cancel_on_interrupt=request.cancel_on_interrupt,
            out=target,
            display=watch,
            on_outcome=on_outcome,
            say=self.say,
        )
        if self.shaped and watcher.fleet is not None:
            from runner.backends.gcp.shapes.apply import fallback_line

            line = fallback_line(watcher.fleet, store, run_id, self.shaped[0].machine_type)
            if line:
                self.say(line)
        return Submitted(run_id, outcome)


def _cache_for(
    request: SubmitRequest, config: Config, dep: Deployment, options: RunOptions
) -> ShardCache:
    """The cross-run cache of this submit: what reaches the task, fingerprinted."""
    return ShardCache(
        dep.backends.store,
        code=request.code_key or code_digest(request.task_dir),
        image=options.image,
        stage=options.stage,
        # Local workers inherit this process's environment; a VM's is its own, the same for
        # every run of the deployment.
        env=task_env(os.environ, inherited=config.is_local),
    )
