"""``runner``: submit a task over many shards, watch it, and get one combined result.

stdout carries what scripts capture (the run id, JSON, where a result went); narration and
progress go to stderr. Exit codes, one meaning each:

- 0: every shard succeeded, or the runner detached on purpose (``--detach``, Ctrl-C);
- 1: a shard failed, or the run was cancelled or halted, or ``combine`` of a run not all done;
- 2: bad input or configuration (one line on stderr says what to fix).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

# Typer vendors click; its exception types are only reachable here.
from typer._click import exceptions as click_exc

from runner import config as config_mod
from runner import report, runs
from runner import shards as shard_sources
from runner.backends import Deployment, open_deployment
from runner.checks import check_task
from runner.combine import Combined, OutTarget, check_out, combine_run
from runner.halt import DEFAULT_HALT, HaltJudge, HaltRule
from runner.submit_plan import describe_bundle, dry_run
from runner.watch import Watcher
from worker import defaults
from worker.errors import CFlowError, ConfigError
from worker.protocol import (
    Event,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    ShardState,
    is_valid_run_id,
)

if TYPE_CHECKING:
    from runner.compose import StripJob
    from runner.prune import Removed
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


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: a usage error or a CFlowError is one line on stderr and exit 2."""
    try:
        code = app(args=argv, prog_name="runner", standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help(), err=True) if exc.ctx else None
        sys.exit(EXIT_OK)
    except click_exc.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "runner"
        err.print(f"error: {exc.format_message()} (see `{command} --help`)", markup=False)
        sys.exit(EXIT_ERROR)
    except typer.Abort:
        sys.exit(130)
    except CFlowError as exc:
        err.print(f"error: {exc}", markup=False)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


@contextmanager
def _deployment(local: bool, store: Path | None, deployment: Path | None) -> Iterator[Deployment]:
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    dep = open_deployment(cfg)
    try:
        yield dep
    finally:
        dep.close()


def _existing_store(local: bool, store: Path | None, deployment: Path | None) -> bool:
    """False for a local store folder that does not exist: reading it must not create it."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    return not cfg.is_local or cfg.store_dir.is_dir()


def _need_run(run_id: str, local: bool, store: Path | None, deployment: Path | None) -> None:
    """Refuse a malformed run id, or any run id where there is no store (creating none)."""
    if not is_valid_run_id(run_id):
        raise _fail(f"{run_id!r} is not a run id; `runner runs` lists them")
    if not _existing_store(local, store, deployment):
        raise _fail(f"no run {run_id}: there is no store here; `runner runs` lists runs")


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _events(dep: Deployment, run_id: str) -> EventBus:
    """The run's own event stream where the deployment has one, else the shared one."""
    per_run = getattr(dep, "run_events", None)
    return per_run(run_id) if per_run is not None else dep.backends.events


def _watcher(
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
        events=_events(dep, manifest.run_id),
        fleet=dep.fleet(slots=slots, idle_timeout=idle_timeout),
        max_workers=min(workers or options.workers or dep.default_workers, shards),
        slots=slots,
        speculate=options.speculate,
    )


# -- submit ------------------------------------------------------------------------------------


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
    halt: HaltOpt = DEFAULT_HALT,
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
        raise _fail("give exactly one of --inputs GLOB, --params FILE.jsonl or --shards N")
    rule = HaltRule.parse(halt)
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    target = check_out(out_dir, cloud=not cfg.is_local)
    for note in check_task(task_dir, import_check=check).notes:
        err.print(f"cflow: {note}", markup=False)
    bundle_note = describe_bundle(task_dir)
    if bundle_note.warning:
        err.print(f"cflow: warning: {bundle_note.warning}", markup=False)
    if dry:
        _dry_run(cfg, task_dir, inputs, params, shard_count, workers, slots, bundle_note.size)
        return
    with _deployment(local, store, deployment) as dep:
        err.print(
            f"cflow: {cfg.describe()}"
            + (" (no deployment found)" if cfg.is_local and not local else ""),
            markup=False,
        )
        source = _source(dep, inputs, params, shard_count)
        options = RunOptions(
            max_attempts=max_attempts,
            timeout=timeout,
            stage=stage,
            workers=workers or dep.default_workers,
            slots=slots,
            speculate=speculate,
        )
        published = 0

        def on_published(n: int) -> None:
            nonlocal published
            published += n
            if published >= 10_000 and err.is_terminal:
                err.print(f"  published {published} shards", end="\r")

        st = dep.backends.store
        manifest = runs.create_run(
            store=st,
            queue=dep.backends.queue,
            task_dir=task_dir,
            shards=source,
            options=options,
            stage_input=dep.stage_input,
            on_published=on_published,
        )
        run_id = manifest.run_id
        out.print(run_id)
        max_workers = min(options.workers, manifest.shard_count)
        err.print(
            f"cflow: run {run_id}: {manifest.shard_count} shards, up to {max_workers} workers"
            f" x {slots} slots, {bundle_note.size_text} bundle; store"
            f" {st.url(Layout.run_prefix(run_id))}",
            markup=False,
        )
        watcher = _watcher(
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
        code = _watch_and_finish(
            watcher, dep, rule=rule, cancel_on_interrupt=cancel_on_interrupt, out=target
        )
    raise typer.Exit(code)


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
        with _deployment(False, None, cfg.deployment_file) as dep:
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


def _watch_and_finish(
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
        snapshot = report.watch_live(watcher, dep.poll_seconds, err)
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
    if not watcher.drain_fleet():
        err.print("cflow: warning: some workers are still stopping")
    manifest = runs.load_manifest(store, run_id).with_state(RunState.FINISHED)
    runs.save_manifest(store, manifest)  # every shard is settled, whatever the combine does
    failed = [r for r in runs.iter_shard_reports(store, manifest) if r.state is ShardState.FAILED]
    try:
        combined = _combine(dep, manifest, out=out)
    except CFlowError as exc:
        report.summary(snapshot, None, [], failed, err)
        err.print(
            f"error: combining run {run_id} failed: {exc}; the shards' outputs are kept, fix"
            f" it and run `runner combine {run_id}`",
            markup=False,
        )
        return EXIT_FAILED
    report.summary(snapshot, (store.url(k) for k in combined.files), combined.written, failed, err)
    return EXIT_FAILED if snapshot.failed else EXIT_OK


def _combine(
    dep: Deployment, manifest: Manifest, *, out: OutTarget | None, headers: bool | None = None
) -> Combined:
    """Combine where the data is: on Google Cloud, header-less copies of big parts are made by
    the workers (a helper run), not through this machine."""
    store = dep.backends.store
    if dep.config.is_local or dep.config.bucket is None:
        return combine_run(store, manifest, out=out, headers=headers, warn=_warn)
    from runner.worker_combine import strip_on_workers, threshold

    bucket = dep.config.bucket

    def strip(jobs: list[StripJob]) -> None:
        err.print(f"cflow: copying {len(jobs)} parts without their headers on the workers")
        strip_on_workers(
            store,
            dep.backends.queue,
            lambda helper, n: _watcher(dep, helper, workers=None, slots=None, shards=n),
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
        warn=_warn,
        strip=strip,
        strip_threshold=threshold(),
    )


def _warn(message: str) -> None:
    err.print(f"cflow: warning: {message}", markup=False)


# -- the other commands ------------------------------------------------------------------------


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
    with _deployment(local, store, deployment) as dep:
        manifest = runs.load_manifest(dep.backends.store, run_id)
        if manifest.state == RunState.CANCELLED.value:
            raise _fail(
                f"run {run_id} was {'halted' if manifest.halted else 'cancelled'};"
                f" `runner retry {run_id} --failed` restarts it"
            )
        watcher = _watcher(dep, manifest, workers=workers, slots=slots, shards=manifest.shard_count)
        code = _watch_and_finish(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
    raise typer.Exit(code)


@app.command()
def status(
    run_id: RunArg,
    as_json: JsonOpt = False,
    state: Annotated[
        list[ShardState] | None,
        typer.Option("--state", help="Only shards in this state (repeatable)."),
    ] = None,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Per-shard state, attempts, durations, exit codes and failure reasons."""
    _need_run(run_id, local, store, deployment)
    wanted = set(state or [])
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        manifest = runs.load_manifest(st, run_id)
        reports = runs.iter_shard_reports(st, manifest)
        if wanted:
            reports = (r for r in reports if r.state in wanted)
        if as_json:
            report.stream_status_json(manifest, reports, sys.stdout)
            return
        rows = list(reports)
    counts = {s.value: 0 for s in ShardState}
    for r in rows:
        counts[r.state.value] += 1
    out.print(report.status_table(manifest, rows), crop=False)
    out.print(" · ".join(f"{v} {k}" for k, v in counts.items() if v or not wanted))


@app.command()
def logs(
    run_id: RunArg,
    shard: Annotated[
        str | None, typer.Option("--shard", help="Shard id (or a unique prefix).")
    ] = None,
    attempt: Annotated[
        int | None, typer.Option("--attempt", min=1, help="Attempt number [default: latest].")
    ] = None,
    follow: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Keep printing while it runs; wait if it is queued."),
    ] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Print a shard's log (without --shard: where each shard's latest log is)."""
    _need_run(run_id, local, store, deployment)
    with _deployment(local, store, deployment) as dep:
        from runner.logs import print_log, where_logs

        st = dep.backends.store
        manifest = runs.load_manifest(st, run_id)
        if shard is None:
            for line in where_logs(st, manifest):
                sys.stdout.write(line + "\n")
            return
        code = print_log(st, manifest, shard, attempt=attempt, follow=follow, err=err)
    raise typer.Exit(code)


@app.command()
def cancel(
    run_id: RunArg,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Stop a run: queued shards are dropped, running ones stopped."""
    _need_run(run_id, local, store, deployment)
    with _deployment(local, store, deployment) as dep:
        dropped = runs.cancel(dep.backends.store, dep.backends.queue, run_id)
    dropped_note = (
        f"{dropped} queued shards dropped" if dropped else "workers drop its queued shards"
    )
    err.print(
        # A worker re-reads a manifest it has cached at its next heartbeat after the cache ages.
        f"cflow: run {run_id} cancelled ({dropped_note}; running ones stop within"
        f" {defaults.MANIFEST_TTL + defaults.HEARTBEAT_SECONDS:g}s)",
        markup=False,
    )


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
        raise _fail("say what to retry: `runner retry RUN --failed [--task DIR]`")
    rule = HaltRule.parse(halt)
    if task_dir is not None:
        check_task(task_dir)
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        retried = runs.retry(st, dep.backends.queue, run_id, task_dir=task_dir)
        if not retried:
            err.print(f"cflow: run {run_id} has no failed shards; nothing to retry", markup=False)
            return
        manifest = runs.load_manifest(st, run_id)
        with_what = f" with bundle {manifest.bundle[:12]}" if task_dir is not None else ""
        err.print(f"cflow: retrying {len(retried)} shards of run {run_id}{with_what}", markup=False)
        watcher = _watcher(dep, manifest, workers=workers, slots=slots, shards=len(retried))
        if detach:
            watcher.poll()
            return
        code = _watch_and_finish(watcher, dep, rule=rule, cancel_on_interrupt=False, out=None)
    raise typer.Exit(code)


@app.command()
def combine(
    run_id: RunArg,
    out_dir: Annotated[
        str | None,
        typer.Option("--out", help="Also write the result here (a folder or gs://BUCKET/PATH)."),
    ] = None,
    headers: Annotated[
        bool | None,
        typer.Option(
            "--headers/--no-headers",
            help="CSV/TSV parts start with a header: keep it once [default: cflow.toml].",
        ),
    ] = None,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Combine the committed outputs of a run (again). Prints where each file went."""
    _need_run(run_id, local, store, deployment)
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    target = check_out(out_dir, cloud=not cfg.is_local)
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        manifest = runs.load_manifest(st, run_id)
        result = _combine(dep, manifest, out=target, headers=headers)
    for where in result.written or [st.url(k) for k in result.files]:
        out.print(where, markup=False)
    if not result.files:
        err.print(
            f"cflow: run {run_id} has no outputs to combine ({result.shards} committed shards"
            " wrote no files)",
            markup=False,
        )
    else:
        err.print(
            f"cflow: combined {len(result.files)} files from {result.shards} shards", markup=False
        )
    if not cfg.is_local:
        err.print(f"cflow: runner traffic: {json.dumps(result.traffic.to_dict())}", markup=False)
    if result.missing:
        settled = len(runs.failed(st, run_id)) + result.shards
        unfinished = manifest.shard_count - settled
        err.print(
            f"cflow: {result.missing} of {manifest.shard_count} shards have no committed output"
            f" ({unfinished} not finished; see `runner status {run_id}`); the result is partial",
            markup=False,
        )
        if unfinished > 0:  # the run is still going (or was cancelled): this is not its result
            raise typer.Exit(EXIT_FAILED)


@app.command("runs")
def list_runs(
    as_json: JsonOpt = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """List runs, oldest first."""
    manifests: list[Manifest] = []
    done: dict[str, int] = {}
    if _existing_store(local, store, deployment):
        with _deployment(local, store, deployment) as dep:
            manifests = runs.list_runs(dep.backends.store)
            done = {m.run_id: len(runs.committed(dep.backends.store, m.run_id)) for m in manifests}
    if as_json:
        sys.stdout.write(json.dumps([report.run_dict(m, done[m.run_id]) for m in manifests]) + "\n")
        return
    if not manifests:
        err.print("cflow: no runs yet")
        return
    out.print(report.runs_table(manifests, done), crop=False)


@app.command()
def rm(
    run_ids: Annotated[list[str], typer.Argument(help="Run ids to delete.")],
    force: Annotated[
        bool, typer.Option("--force", help="Also delete a run still going (cancels it first).")
    ] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Delete runs: their objects, queue entries, and bundles no other run uses."""
    from runner.prune import remove_runs

    for run_id in run_ids:
        _need_run(run_id, local, store, deployment)
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        manifests = [runs.load_manifest(st, r) for r in run_ids]
        removed = remove_runs(st, dep.backends.queue, manifests, force=force)
    _removed_note(removed)


@app.command()
def prune(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Delete runs created longer ago, e.g. 7d, 12h.")
    ],
    dry: Annotated[
        bool, typer.Option("--dry-run", help="List what would go; delete nothing.")
    ] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Delete runs older than an age that are not going (finished or cancelled)."""
    from runner.prune import older_than as pick
    from runner.prune import parse_age, remove_runs

    age = parse_age(older_than)
    if not _existing_store(local, store, deployment):
        err.print("cflow: no runs yet")
        return
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        old = pick(runs.list_runs(st), age, time.time())
        going = [m for m in old if m.state == RunState.ACTIVE.value]
        doomed = [m for m in old if m.state != RunState.ACTIVE.value]
        for m in going:
            err.print(f"cflow: keeping {m.run_id}: it is still active (`runner rm --force`)")
        if dry:
            for m in doomed:
                out.print(m.run_id, markup=False)
            return
        removed = remove_runs(st, dep.backends.queue, doomed)
    _removed_note(removed)


def _removed_note(removed: Removed) -> None:
    for run_id in removed.runs:
        out.print(run_id, markup=False)
    err.print(
        f"cflow: deleted {len(removed.runs)} runs ({removed.objects} objects,"
        f" {removed.messages} queued messages, {len(removed.bundles)} unused bundles)",
        markup=False,
    )


@app.command()
def doctor(
    as_json: JsonOpt = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Check the backend: locally the store and bash; in the cloud credentials, bucket, topics,
    subscriptions and instance group."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    checks: list[Any]
    if cfg.is_local:
        from runner.local_doctor import local_checks

        checks = local_checks(cfg)
    else:
        from runner.doctor import Check, run_checks  # the cloud clients load only when needed

        err.print(f"cflow: checking {cfg.describe()}", markup=False)

        def show(check: Check) -> None:
            mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
            err.print(f"  {mark} {check.name}: {check.detail}")

        checks = run_checks(cfg, on_check=show)
    if cfg.is_local:
        for c in checks:
            err.print(f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}", markup=False)
    if as_json:
        sys.stdout.write(json.dumps([c.to_dict() for c in checks]) + "\n")
    failed = [c for c in checks if not c.ok]
    if failed:
        err.print(f"cflow: {len(failed)} of {len(checks)} checks failed; fix them and run again")
        raise typer.Exit(EXIT_ERROR)
    err.print(
        "cflow: the local backend is ready" if cfg.is_local else "cflow: the deployment is ready"
    )
