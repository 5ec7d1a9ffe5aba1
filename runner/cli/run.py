"""``runner submit``, ``watch`` and ``retry``: the commands that run shards."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from runner import config as config_mod
from runner.backends.factory import Deployment
from runner.backends.gcp.shapes.apply import (
    apply_run_shape,
    check_shape_options,
    fallback_line,
    needs_groups,
)
from runner.cli.common import (
    DeploymentOpt,
    HaltOpt,
    LocalOpt,
    RunArg,
    SlotsOpt,
    StoreOpt,
    WorkersOpt,
    app,
    err,
    fail,
    make_watcher,
    need_run,
    open_dep,
    out,
    resume_publishing,
    watch_and_finish,
)
from runner.engine import runs
from runner.engine import shards as shard_sources
from runner.engine.checks import CheckReport, check_task
from runner.engine.fleet import Fleet
from runner.engine.halt import DEFAULT_HALT, HaltRule
from runner.engine.plan import describe_bundle, dry_run
from runner.results.combine import check_out
from worker import defaults
from worker.errors import ConfigError
from worker.executors.container.runtime import check_image
from worker.protocol import Layout, Manifest, RunOptions, RunState


@app.command()
def submit(
    task_dir: Annotated[Path, typer.Argument(help="Folder with task.py (run(shard)) or task.sh.")],
    inputs: Annotated[
        str | None, typer.Option("--inputs", help="Glob of input files, one shard each.")
    ] = None,
    params: Annotated[
        Path | None, typer.Option("--params", help="JSON-lines file, one shard per line.")
    ] = None,
    shard_count: Annotated[
        int | None, typer.Option("--shards", help="N shards with params {'index': i}.")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", min=1, help="Most workers (processes or VMs) at once."),
    ] = None,
    slots: Annotated[int, typer.Option("--slots", min=1, max=256, help="Shards per worker.")] = 1,
    max_attempts: Annotated[
        int, typer.Option("--max-attempts", min=1, max=100, help="Task failures allowed per shard.")
    ] = defaults.MAX_ATTEMPTS,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds one attempt may run.")
    ] = defaults.ATTEMPT_TIMEOUT,
    stage: Annotated[
        bool, typer.Option("--stage/--no-stage", help="Copy remote inputs to the worker first.")
    ] = True,
    detach: Annotated[
        bool, typer.Option("--detach", help="Enqueue and start workers, then return.")
    ] = False,
    cancel_on_interrupt: Annotated[
        bool,
        typer.Option("--cancel-on-interrupt", help="Ctrl-C cancels the run (default: detach)."),
    ] = False,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Also write the combined result here (a folder or gs://...)."),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option("--idle-timeout", min=1, help="Seconds an idle worker waits before leaving."),
    ] = None,
    speculate: Annotated[
        bool,
        typer.Option(
            "--speculate",
            help="Near the end, run a backup attempt of stragglers; the first to commit wins.",
        ),
    ] = False,
    isolate: Annotated[
        bool,
        typer.Option(
            "--isolate",
            help="Run each Python shard in a fresh process (for tasks that leak state between "
            "shards); by default one warm process per slot runs shard after shard.",
        ),
    ] = False,
    image: Annotated[
        str | None,
        typer.Option("--image", help="Run each attempt in this container image (podman/docker)."),
    ] = None,
    halt: HaltOpt = DEFAULT_HALT,
    machine_type: Annotated[
        str | None,
        typer.Option("--machine-type", help="VM machine type for this run (Google Cloud)."),
    ] = None,
    gpu: Annotated[
        str | None, typer.Option("--gpu", help="GPUs per VM, TYPE[:COUNT] (nvidia-l4:1).")
    ] = None,
    disk_gb: Annotated[
        int | None, typer.Option("--disk-gb", help="Boot disk size of this run's VMs, GB.")
    ] = None,
    provisioning: Annotated[
        str | None, typer.Option("--provisioning", help="spot or standard VMs for this run.")
    ] = None,
    fallback: Annotated[
        str | None,
        typer.Option("--fallback", help="standard: Spot first, standard VMs for the tail."),
    ] = None,
    fallback_after: Annotated[
        int, typer.Option("--fallback-after", min=1, help="Preemptions of a shard that fall back.")
    ] = 3,
    check: Annotated[
        bool,
        typer.Option("--check/--no-check", help="Check the task can start before publishing."),
    ] = True,
    dry: Annotated[
        bool,
        typer.Option("--dry-run", help="List the shards and what would start; start nothing."),
    ] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Publish shards, start workers, watch progress, combine outputs. Prints the run id."""
    chosen = [
        n
        for n, v in (("--inputs", inputs), ("--params", params), ("--shards", shard_count))
        if v is not None
    ]
    if len(chosen) != 1:
        raise fail("give exactly one of --inputs GLOB, --params FILE.jsonl or --shards N")
    rule = HaltRule.parse(halt)
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    target = check_out(out_dir, cloud=not cfg.is_local)
    # The import check runs in its own interpreter while this one goes on (a short local run's
    # workers boot meanwhile); nothing is published before it has passed.
    checked = check_task(task_dir, import_check=check, wait=False)
    try:
        bundle_note = describe_bundle(task_dir)
        if bundle_note.warning:
            err.print(f"cflow: warning: {bundle_note.warning}", markup=False)
        if dry or not cfg.is_local:  # nothing is made in the cloud for a task that cannot start
            _narrate(checked)
        if dry:
            _dry_run(cfg, task_dir, inputs, params, shard_count, workers, slots, bundle_note.size)
            return
        store_was_there = cfg.is_local and cfg.store_dir.exists()
        with open_dep(local, store, deployment) as dep:
            source = _source(dep, inputs, params, shard_count)
            options = RunOptions(
                max_attempts=max_attempts,
                timeout=timeout,
                stage=stage,
                workers=workers or dep.default_workers,
                slots=slots,
                speculate=speculate,
                isolate=isolate,
                image=image,
                machine_type=machine_type,
                provisioning=provisioning,
                gpu=gpu,
                disk_gb=disk_gb,
                fallback=fallback,
                fallback_after=fallback_after,
            )
            check_shape_options(options)  # bad shape options: one line, before anything
            if needs_groups(options, cloud=False) and cfg.is_local:
                err.print(
                    "cflow: machine shape and --fallback apply to Google Cloud VMs; ignored here"
                    + (" (the containers get this machine's GPUs)" if gpu and image else "")
                )
            shaped_groups = []
            if (
                needs_groups(options) and not cfg.is_local
            ):  # checked in the zone, made, then publish
                shaped_groups = apply_run_shape(dep, options)
                for shaped in shaped_groups:
                    err.print(
                        f"cflow: VMs from group {shaped.group} ({shaped.describe})", markup=False
                    )
            if image is not None and cfg.is_local:  # the workers share this machine's images
                check_image(image, gpu=gpu is not None)
            if not cfg.is_local:  # a group holds at most 1,000 (zonal) or 2,000 VMs: say so now
                from runner.backends.gcp.fleet import (
                    check_size,
                )  # the Compute client loads only for the cloud

                check_size(options.workers, zonal=not cfg.region)
            published = 0

            def on_published(n: int) -> None:
                nonlocal published
                published += n
                if published >= 10_000 and err.is_terminal:
                    err.print(f"  published {published} shards", end="\r")

            st = dep.backends.store
            fleet = dep.fleet(slots=slots, idle_timeout=idle_timeout)
            # Local workers boot while the run is made (their interpreter start is most of a short
            # run's fixed cost); VMs are sized once the shard count is known.
            early = [] if detach else _start_early(fleet, dep, options.workers, shard_count)
            try:
                _narrate(checked)
            except BaseException:  # the task cannot start: take back what was started
                _undo_early(fleet, early, cfg, store_was_there)
                raise
            err.print(
                f"cflow: {cfg.describe()}"
                + (" (no deployment found)" if cfg.is_local and not local else ""),
                markup=False,
            )
            staging = tempfile.TemporaryDirectory(prefix="cflow-task-")
            try:
                bundled = task_dir
                if (
                    dep.prepare_task is not None
                ):  # Google Cloud: requirements as wheels the VMs take
                    bundled = dep.prepare_task(task_dir, Path(staging.name))
                manifest = runs.create_run(
                    store=st,
                    queue=dep.backends.queue,
                    task_dir=bundled,
                    shards=source,
                    options=options,
                    stage_input=dep.stage_input,
                    on_published=on_published,
                    on_created=_print_run_id,  # before publishing: an interrupted submit resumes
                )
            except BaseException:
                if early:
                    fleet.delete(early)
                raise
            finally:
                staging.cleanup()
            run_id = manifest.run_id
            max_workers = min(options.workers, manifest.shard_count)
            err.print(
                f"cflow: run {run_id}: {manifest.shard_count} shards, up to {max_workers} workers"
                f" x {slots} slots, {bundle_note.size_text} bundle; store"
                f" {st.url(Layout.run_prefix(run_id))}",
                markup=False,
            )
            watcher = make_watcher(
                dep,
                manifest,
                workers=workers,
                slots=slots,
                shards=manifest.shard_count,
                idle_timeout=idle_timeout,
            )
            watcher.max_workers = max_workers
            if detach:
                watcher.poll()  # starts the workers
                err.print(f"cflow: detached; follow with `runner watch {run_id}`", markup=False)
                return
            code = watch_and_finish(
                watcher, dep, rule=rule, cancel_on_interrupt=cancel_on_interrupt, out=target
            )
            if shaped_groups and watcher.fleet is not None:
                line = fallback_line(watcher.fleet, st, run_id, shaped_groups[0].machine_type)
                if line:
                    err.print(f"cflow: {line}", markup=False)
        raise typer.Exit(code)
    finally:
        if checked.probe is not None:  # the submit ended before it: stop the check
            checked.probe.cancel()


def _narrate(checked: CheckReport) -> None:
    checked.finish()  # raises TaskError with the task's own last line
    for note in checked.notes:
        err.print(f"cflow: {note}", markup=False)
    checked.notes.clear()  # said once


def _undo_early(
    fleet: Fleet, early: list[str], cfg: config_mod.Config, store_was_there: bool
) -> None:
    """A submit that fails its task check leaves nothing: the workers it started go, and so
    does the store it created (when no run has reached it)."""
    if early:
        fleet.delete(early)
        fleet.wait_empty(10.0)
    runs_dir = cfg.store_dir / "runs"
    if cfg.is_local and not store_was_there and not (runs_dir.exists() and any(runs_dir.iterdir())):
        shutil.rmtree(cfg.store_dir, ignore_errors=True)


def _start_early(fleet: Fleet, dep: Deployment, workers: int, shards: int | None) -> list[str]:
    """On the local backend, start the workers a run is sure to need before it is made."""
    if not dep.config.is_local:
        return []
    wanted = min(workers, shards if shards is not None else 1) - len(fleet.instances())
    return fleet.grow(wanted) if wanted > 0 else []


def _source(
    dep: Deployment, inputs: str | None, params: Path | None, count: int | None
) -> Iterator[shard_sources.Shard]:
    if inputs is not None:
        return shard_sources.from_glob(inputs, lister=dep.lister)
    if params is not None:
        return shard_sources.from_params(params)
    assert count is not None
    return shard_sources.from_count(count)


def _dry_run(
    cfg: config_mod.Config,
    task_dir: Path,
    inputs: str | None,
    params: Path | None,
    count: int | None,
    workers: int | None,
    slots: int,
    bundle_size: int,
) -> None:
    """Shards on stdout, one a line; what would start on stderr. Nothing is created."""
    if inputs is not None and inputs.startswith("gs://") and not cfg.is_local:
        with open_dep(False, None, cfg.deployment_file) as dep:
            plan = dry_run(
                cfg, task_dir, _source(dep, inputs, None, None), workers, slots, sys.stdout
            )
    else:
        if inputs is not None and inputs.startswith("gs://"):
            raise ConfigError(
                f"{inputs} is a Cloud Storage input; it needs the Google Cloud backend"
            )
        source = (
            shard_sources.from_glob(inputs)
            if inputs is not None
            else shard_sources.from_params(params)
            if params is not None
            else shard_sources.from_count(count or 0)
        )
        plan = dry_run(cfg, task_dir, source, workers, slots, sys.stdout)
    err.print(f"cflow: dry run: {plan}; nothing was started", markup=False)


def _print_run_id(manifest: Manifest) -> None:
    out.print(manifest.run_id)
    sys.stdout.flush()


@app.command()
def watch(
    run_id: RunArg,
    halt: HaltOpt = DEFAULT_HALT,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
    workers: WorkersOpt = None,
    slots: SlotsOpt = None,
) -> None:
    """Re-attach to a run: live progress, scale-down, and combine when it ends."""
    rule = HaltRule.parse(halt)
    need_run(run_id, local, store, deployment)
    with open_dep(local, store, deployment) as dep:
        manifest = runs.load_manifest(dep.backends.store, run_id)
        if manifest.state == RunState.CANCELLED.value:
            raise fail(
                f"run {run_id} was {'halted' if manifest.halted else 'cancelled'};"
                f" `runner retry {run_id} --failed` restarts it"
            )
        if needs_groups(manifest.run_options) and not dep.config.is_local:
            # The run's own groups and queue, as submitted: what is left to publish goes there.
            apply_run_shape(dep, manifest.run_options)
        manifest = resume_publishing(dep, manifest)
        watcher = make_watcher(
            dep, manifest, workers=workers, slots=slots, shards=manifest.shard_count
        )
        code = watch_and_finish(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
    raise typer.Exit(code)


@app.command()
def retry(
    run_id: RunArg,
    failed_only: Annotated[
        bool, typer.Option("--failed", help="Re-enqueue the failed and unfinished shards.")
    ] = False,
    task_dir: Annotated[
        Path | None,
        typer.Option("--task", help="Run the retried shards with this (fixed) task folder."),
    ] = None,
    halt: HaltOpt = DEFAULT_HALT,
    workers: WorkersOpt = None,
    slots: SlotsOpt = None,
    detach: Annotated[bool, typer.Option("--detach", help="Enqueue, then return.")] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Re-run the failed (or unfinished) shards of a run; committed shards stay as they are.

    Without --task the retried shards run the bundle the run last used.
    """
    if not failed_only:
        raise fail("say what to retry: `runner retry RUN --failed [--task DIR]`")
    rule = HaltRule.parse(halt)
    need_run(run_id, local, store, deployment)
    if task_dir is not None:
        check_task(task_dir)
    with open_dep(local, store, deployment) as dep:
        st = dep.backends.store
        interrupted = runs.load_manifest(st, run_id)
        if needs_groups(interrupted.run_options) and not dep.config.is_local:
            apply_run_shape(dep, interrupted.run_options)  # retried shards go to its shape
        if interrupted.state == RunState.ACTIVE.value and interrupted.publishing:
            # Nothing failed yet: the submit was cut off. Finish it, as `runner watch` would.
            interrupted = resume_publishing(dep, interrupted)
            watcher = make_watcher(
                dep, interrupted, workers=workers, slots=slots, shards=interrupted.shard_count
            )
            if detach:
                watcher.poll()
                return
            raise typer.Exit(
                watch_and_finish(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
            )
        retried = runs.retry(st, dep.backends.queue, run_id, task_dir=task_dir)
        if not retried:
            err.print(f"cflow: run {run_id} has no failed shards; nothing to retry", markup=False)
            return
        manifest = runs.mark_published(st, runs.load_manifest(st, run_id))
        with_what = f" with bundle {manifest.bundle[:12]}" if task_dir is not None else ""
        err.print(f"cflow: retrying {len(retried)} shards of run {run_id}{with_what}", markup=False)
        watcher = make_watcher(dep, manifest, workers=workers, slots=slots, shards=len(retried))
        if detach:
            watcher.poll()
            return
        code = watch_and_finish(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
    raise typer.Exit(code)
