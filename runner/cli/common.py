"""What every ``runner`` command shares: the app, consoles, options, exit codes, helpers.

stdout carries what scripts capture (the run id, JSON, where a result went); narration and
progress go to stderr. Exit codes, one meaning each:

- 0: every shard succeeded, or the runner detached on purpose (``--detach``, Ctrl-C);
- 1: a shard failed, or the run was cancelled or halted, or ``combine`` of an unfinished run;
- 2: bad input or configuration (one line on stderr says what to fix).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from runner import config as config_mod
from runner.backends.factory import Deployment, open_deployment
from runner.cli import progress
from runner.engine import runs
from runner.engine.halt import HaltJudge, HaltRule
from runner.engine.watch import Snapshot, Watcher
from runner.results.combine import Combined, OutTarget, combine_run
from worker.errors import CFlowError
from worker.protocol import (
    AttemptState,
    AttemptStatus,
    Event,
    Layout,
    Manifest,
    RunState,
    ShardState,
    is_valid_run_id,
)

if TYPE_CHECKING:
    from runner.backends.gcp.compose import StripJob
    from worker.queue import EventBus

app = typer.Typer(
    help="CFlow: run one task over many inputs on preemptible VMs, or on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: never hard-wrap a line at the console's width (logs, CI, pipes).
err = Console(stderr=True, highlight=False, soft_wrap=True)
# Off a terminal rich would squeeze tables into 80 columns and cut ids: give them room instead.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 1 << 16)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2

LocalOpt = Annotated[
    bool,
    typer.Option("--local", help="Use the embedded local backend even if a deployment exists."),
]
StoreOpt = Annotated[
    Path | None,
    typer.Option(
        "--store", envvar="CFLOW_STORE", help="Local backend directory [default: ./.cflow]."
    ),
]
DeploymentOpt = Annotated[
    Path | None,
    typer.Option(
        "--deployment",
        envvar="CFLOW_DEPLOYMENT",
        help="Outputs file of `cdktf deploy --outputs-file` [default: ./cflow-outputs.json].",
    ),
]
RunArg = Annotated[str, typer.Argument(help="Run id (see `runner runs`).")]
WorkersOpt = Annotated[
    int | None,
    typer.Option("--workers", min=1, help="Most workers at once [default: as submitted]."),
]
SlotsOpt = Annotated[
    int | None,
    typer.Option("--slots", min=1, max=256, help="Shards per worker [default: as submitted]."),
]
HaltOpt = Annotated[
    str,
    typer.Option(
        "--halt",
        help="Stop the run early: same,fail=N (the first N attempts all failed alike),"
        " now,fail=N (N attempts failed), or never.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON on stdout.")]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            out.print(f"cflow {package_version('cflow')}")
        except PackageNotFoundError:
            out.print("cflow (not installed as a package)")
        raise typer.Exit(EXIT_OK)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """CFlow: run one task over many inputs on preemptible VMs, or on this machine."""


@contextmanager
def open_dep(local: bool, store: Path | None, deployment: Path | None) -> Iterator[Deployment]:
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    dep = open_deployment(cfg)
    try:
        yield dep
    finally:
        dep.close()


def store_exists(local: bool, store: Path | None, deployment: Path | None) -> bool:
    """False for a local store folder that does not exist: reading it must not create it."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    return not cfg.is_local or cfg.store_dir.is_dir()


def need_run(run_id: str, local: bool, store: Path | None, deployment: Path | None) -> None:
    """Refuse a malformed run id, or any run id where there is no store (creating none)."""
    if not is_valid_run_id(run_id):
        raise fail(f"{run_id!r} is not a run id; `runner runs` lists them")
    if not store_exists(local, store, deployment):
        raise fail(f"no run {run_id}: there is no store here; `runner runs` lists runs")


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def run_events(dep: Deployment, manifest: Manifest) -> EventBus:
    """The run's own event stream (from a little before the run was made)."""
    return dep.run_events(manifest.run_id, since=manifest.created_at - 5)


def make_watcher(
    dep: Deployment,
    manifest: Manifest,
    *,
    workers: int | None,
    slots: int | None,
    shards: int,
    idle_timeout: float | None = None,
) -> Watcher:
    """A watcher sized as the run was submitted, unless told otherwise."""
    options = manifest.run_options
    slots = slots or options.slots
    return Watcher(
        manifest=manifest,
        store=dep.backends.store,
        queue=dep.backends.queue,
        events=run_events(dep, manifest),
        fleet=dep.fleet(slots=slots, idle_timeout=idle_timeout),
        max_workers=min(workers or options.workers or dep.default_workers, shards),
        slots=slots,
        speculate=options.speculate,
        expect_heartbeats=True,  # this version's workers send them during long attempts
        quiet_poll_seconds=dep.quiet_poll_seconds,
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


def resume_publishing(dep: Deployment, manifest: Manifest) -> Manifest:
    """Finish publishing a run whose submit was interrupted (re-sending the last unconfirmed
    batch is harmless: the first commit wins)."""
    if manifest.state != RunState.ACTIVE.value or not manifest.publishing:
        return manifest
    err.print(
        f"cflow: run {manifest.run_id} was interrupted while publishing"
        f" ({manifest.published} of {manifest.shard_count} shards); publishing the rest",
        markup=False,
    )
    return runs.publish_rest(dep.backends.store, dep.backends.queue, manifest)


def watch_and_finish(
    watcher: Watcher,
    dep: Deployment,
    *,
    rule: HaltRule,
    cancel_on_interrupt: bool,
    out: OutTarget | None,
) -> int:
    run_id = watcher.run_id
    store = dep.backends.store
    judge = HaltJudge(rule, run_id)

    def on_event(event: Event) -> None:
        note = judge.saw(event)
        if note is not None:
            runs.cancel(store, dep.backends.queue, run_id, halted=note)
            watcher.manifest = runs.load_manifest(store, run_id)

    watcher.on_event = on_event
    try:
        snapshot = progress.watch_live(watcher, dep.poll_seconds, err)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            runs.cancel(store, dep.backends.queue, run_id)
            watcher.drain_fleet(force=True)
            err.print(f"\ncflow: run {run_id} cancelled", markup=False)
            return EXIT_FAILED
        err.print(
            f"\ncflow: detached; run {run_id} goes on. Re-attach: `runner watch {run_id}`;"
            f" stop it: `runner cancel {run_id}`",
            markup=False,
        )
        return EXIT_OK
    if snapshot.cancelled:
        watcher.drain_fleet(force=True)
        manifest = runs.load_manifest(store, run_id)
        if manifest.halted:
            err.print(f"cflow: run {run_id} halted: {manifest.halted}", markup=False)
            err.print(
                f"  fix the task, then `runner retry {run_id} --failed --task DIR`"
                " (or submit with --halt never)",
                markup=False,
            )
        else:
            err.print(f"cflow: run {run_id} was cancelled", markup=False)
        return EXIT_FAILED
    # Every shard is settled: the workers stop while the outputs are combined.
    watcher.drain_fleet(wait=False)
    try:
        return _finish(watcher, dep, snapshot, out)
    finally:
        if not watcher.wait_drained():
            err.print("cflow: warning: some workers are still stopping")


def _finish(watcher: Watcher, dep: Deployment, snapshot: Snapshot, out: OutTarget | None) -> int:
    run_id = watcher.run_id
    store = dep.backends.store
    manifest = runs.load_manifest(store, run_id).with_state(RunState.FINISHED)
    runs.save_manifest(store, manifest)  # every shard is settled, whatever the combine does
    failed = (  # read every shard's records only when some failed
        [r for r in runs.iter_shard_reports(store, manifest) if r.state is ShardState.FAILED]
        if snapshot.failed
        else []
    )
    try:
        combined = combine_where_data_is(dep, manifest, out=out)
    except CFlowError as exc:
        progress.summary(snapshot, None, [], failed, err)
        err.print(
            f"error: combining run {run_id} failed: {exc}; the shards' outputs are kept, fix"
            f" it and run `runner combine {run_id}`",
            markup=False,
        )
        return EXIT_FAILED
    progress.summary(
        snapshot, (store.url(k) for k in combined.files), combined.written, failed, err
    )
    return EXIT_FAILED if snapshot.failed else EXIT_OK


def combine_where_data_is(
    dep: Deployment, manifest: Manifest, *, out: OutTarget | None, headers: bool | None = None
) -> Combined:
    """Combine where the data is: on Google Cloud, header-less copies of big parts are made by
    the workers (a helper run), not through this machine."""
    store = dep.backends.store
    if dep.config.is_local or dep.config.bucket is None:
        return combine_run(store, manifest, out=out, headers=headers, warn=warn)
    from runner.backends.gcp.strip import strip_on_workers, threshold

    bucket = dep.config.bucket

    def strip(jobs: list[StripJob]) -> None:
        err.print(f"cflow: copying {len(jobs)} parts without their headers on the workers")
        strip_on_workers(
            store,
            dep.backends.queue,
            lambda helper, n: make_watcher(dep, helper, workers=None, slots=None, shards=n),
            run_id=manifest.run_id,
            bucket=bucket,
            jobs=jobs,
            poll_seconds=dep.poll_seconds,
        )

    return combine_run(
        store,
        manifest,
        out=out,
        headers=headers,
        warn=warn,
        strip=strip,
        strip_threshold=threshold(),
    )


def warn(message: str) -> None:
    err.print(f"cflow: warning: {message}", markup=False)
