"""``runner``: submit a task over many shards, watch it, and get one combined result.

stdout carries what scripts capture (the run id, JSON); narration and progress go to stderr.
Exit codes: 0 every shard succeeded; 1 a shard failed (or the run was cancelled or detached);
2 bad input or configuration, with one line saying what to fix.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from runner import config as config_mod
from runner import report, runs
from runner import shards as shard_sources
from runner.backends import Deployment, open_deployment
from runner.combine import combine_run
from runner.watch import Watcher
from worker import defaults
from worker.errors import CFlowError
from worker.protocol import Layout, Manifest, RunOptions, RunState, ShardState
from worker.store import Store

app = typer.Typer(
    help="CFlow: run one task over many inputs on preemptible VMs, or on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)

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


def _watcher(
    dep: Deployment, manifest: Manifest, *, workers: int | None, slots: int | None, shards: int
) -> Watcher:
    """A watcher sized as the run was submitted, unless told otherwise."""
    options = manifest.run_options
    slots = slots or options.slots
    return Watcher(
        manifest=manifest,
        store=dep.backends.store,
        queue=dep.backends.queue,
        events=dep.run_events(manifest.run_id, since=manifest.created_at - 5),
        fleet=dep.fleet(slots=slots),
        max_workers=min(workers or options.workers or dep.default_workers, shards),
        slots=slots,
        speculate=options.speculate,
        expect_heartbeats=True,
    )


@contextmanager
def _deployment(local: bool, store: Path | None, deployment: Path | None) -> Iterator[Deployment]:
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    dep = open_deployment(cfg)
    try:
        yield dep
    finally:
        dep.close()


def _fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def main() -> None:
    """Console-script entry: every CFlowError becomes one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except CFlowError as exc:
        err.print(f"[red]error:[/red] {exc}")
        sys.exit(EXIT_ERROR)


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
        Path | None, typer.Option("--out", help="Also copy the combined output here.")
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
    with _deployment(local, store, deployment) as dep:
        cfg = dep.config
        err.print(
            f"cflow: {cfg.describe()}"
            + (" (no deployment found)" if cfg.is_local and not local else "")
        )
        if inputs is not None:
            source = shard_sources.from_glob(inputs, lister=dep.lister)
        elif params is not None:
            source = shard_sources.from_params(params)
        else:
            assert shard_count is not None
            source = shard_sources.from_count(shard_count)
        options = RunOptions(
            max_attempts=max_attempts,
            timeout=timeout,
            stage=stage,
            workers=workers or dep.default_workers,
            slots=slots,
            speculate=speculate,
            isolate=isolate,
        )
        published = 0

        def on_published(n: int) -> None:
            nonlocal published
            published += n
            if published >= 10_000:
                err.print(f"  published {published} shards", end="\r")

        store_ = dep.backends.store
        manifest = runs.create_run(
            store=store_,
            queue=dep.backends.queue,
            task_dir=task_dir,
            shards=source,
            options=options,
            stage_input=dep.stage_input,
            on_published=on_published,
            on_created=_print_run_id,  # before publishing: an interrupted submit is resumable
        )
        run_id = manifest.run_id
        max_workers = min(options.workers, manifest.shard_count)
        err.print(
            f"cflow: run {run_id}: {manifest.shard_count} shards, up to {max_workers} workers"
            f" x {slots} slots; store {store_.url(Layout.run_prefix(run_id))}"
        )
        fleet = dep.fleet(slots=slots, idle_timeout=idle_timeout)
        watcher = Watcher(
            manifest=manifest,
            store=store_,
            queue=dep.backends.queue,
            events=dep.run_events(run_id, since=manifest.created_at - 5),
            fleet=fleet,
            max_workers=max_workers,
            slots=slots,
            speculate=speculate,
            expect_heartbeats=True,
        )
        if detach:
            watcher.poll()  # starts the workers
            err.print(f"cflow: detached; follow with `runner watch {run_id}`")
            return
        code = _watch_and_finish(
            watcher, dep, cancel_on_interrupt=cancel_on_interrupt, out_dir=out_dir
        )
    raise typer.Exit(code)


def _print_run_id(manifest: Manifest) -> None:
    out.print(manifest.run_id)
    sys.stdout.flush()


def _resume_publishing(dep: Deployment, manifest: Manifest) -> Manifest:
    """Finish publishing a run whose submit was interrupted (re-sending the last unconfirmed
    batch is harmless: the first commit wins)."""
    if manifest.state != RunState.ACTIVE.value or not manifest.publishing:
        return manifest
    err.print(
        f"cflow: run {manifest.run_id} was interrupted while publishing"
        f" ({manifest.published} of {manifest.shard_count} shards); publishing the rest"
    )
    return runs.publish_rest(dep.backends.store, dep.backends.queue, manifest)


def _watch_and_finish(
    watcher: Watcher, dep: Deployment, *, cancel_on_interrupt: bool, out_dir: Path | None
) -> int:
    run_id = watcher.run_id
    store = dep.backends.store
    try:
        snapshot = report.watch_live(watcher, dep.poll_seconds, err)
    except KeyboardInterrupt:
        if cancel_on_interrupt:
            runs.cancel(store, dep.backends.queue, run_id)
            watcher.drain_fleet(force=True)
            err.print(f"\ncflow: run {run_id} cancelled")
            return EXIT_FAILED
        err.print(
            f"\ncflow: detached; run {run_id} goes on. Re-attach: `runner watch {run_id}`;"
            f" stop it: `runner cancel {run_id}`"
        )
        return EXIT_FAILED
    if snapshot.cancelled:
        watcher.drain_fleet(force=True)
        err.print(f"cflow: run {run_id} was cancelled")
        return EXIT_FAILED
    if not watcher.drain_fleet():
        err.print("cflow: [yellow]warning:[/yellow] some workers are still stopping")
    manifest = runs.load_manifest(store, run_id)
    combined = combine_run(store, manifest, out=out_dir)
    runs.save_manifest(store, manifest.with_state(RunState.FINISHED))
    report.summary(snapshot, combined.files, store, out_dir, err)
    return EXIT_FAILED if snapshot.failed else 0


# -- the other commands ------------------------------------------------------------------------


@app.command()
def watch(
    run_id: RunArg,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
    workers: WorkersOpt = None,
    slots: SlotsOpt = None,
) -> None:
    """Re-attach to a run: live progress, scale-down, and combine when it ends."""
    with _deployment(local, store, deployment) as dep:
        manifest = runs.load_manifest(dep.backends.store, run_id)
        if manifest.state == RunState.CANCELLED.value:
            raise _fail(f"run {run_id} was cancelled; `runner retry {run_id} --failed` restarts it")
        manifest = _resume_publishing(dep, manifest)
        watcher = _watcher(dep, manifest, workers=workers, slots=slots, shards=manifest.shard_count)
        code = _watch_and_finish(watcher, dep, cancel_on_interrupt=False, out_dir=None)
    raise typer.Exit(code)


@app.command()
def status(
    run_id: RunArg,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Per-shard state, attempts, durations and exit codes."""
    with _deployment(local, store, deployment) as dep:
        manifest = runs.load_manifest(dep.backends.store, run_id)
        reports = runs.shard_reports(dep.backends.store, run_id)
        reports = runs.flag_lost(reports, *_live_workers(dep, run_id, reports))
    counts = {state.value: 0 for state in ShardState}
    for r in reports:
        counts[r.state.value] += 1
    if as_json:
        out.print_json(
            json.dumps(
                {
                    "run_id": run_id,
                    "state": manifest.state,
                    "created_at": manifest.created_at,
                    "counts": counts,
                    "shards": [r.to_dict() for r in reports],
                }
            )
        )
        return
    out.print(report.status_table(manifest, reports))
    out.print(" · ".join(f"{v} {k}" for k, v in counts.items()))


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
        bool, typer.Option("--follow", "-f", help="Keep printing while it runs.")
    ] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Print a shard's log (without --shard: where each shard's latest log is)."""
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        runs.load_manifest(st, run_id)
        reports = runs.shard_reports(st, run_id)
        if shard is None:
            for r in reports:
                if r.attempts:
                    key = Layout.log(run_id, r.id, r.attempts[-1].attempt)
                    out.print(f"{r.id}\t{r.state.value}\t{st.url(key)}")
            return
        matches = [r for r in reports if r.id == shard] or [
            r for r in reports if r.id.startswith(shard)
        ]
        if len(matches) != 1:
            what = "matches no shard" if not matches else f"matches {len(matches)} shards"
            raise _fail(
                f"--shard {shard!r} {what} of run {run_id}; `runner status {run_id}` lists them"
            )
        report = matches[0]
        if not report.attempts:
            raise _fail(f"shard {report.id} has not started yet")
        number = attempt or report.attempts[-1].attempt
        key = Layout.log(run_id, report.id, number)
        printed = polls = 0
        while True:
            try:
                data = st.get(key)
            except CFlowError:
                data = b""
            if len(data) > printed:
                sys.stdout.buffer.write(data[printed:])
                sys.stdout.flush()
                printed = len(data)
            if not follow or _attempt_over(st, run_id, report.id, number):
                break
            polls += 1
            if polls % 5 == 1 and (gone := _worker_gone(dep, run_id, report.id, number)):
                err.print(f"cflow: worker {gone} is gone; attempt {number} was lost")
                break
            time.sleep(1.0)


def _live_workers(
    dep: Deployment, run_id: str, reports: list[runs.ShardReport] | None = None
) -> tuple[set[str], dict[str, str] | None]:
    """The fleet's instance names and the run's lease holders (None where unknown), looked up
    only when some attempt claims to be running."""
    if reports is not None and not any(r.state is ShardState.RUNNING for r in reports):
        return set(), None
    fleet = dep.fleet()
    try:
        names = {i.name for i in fleet.instances()}
    finally:
        fleet.close()
    return names, dep.backends.queue.leases(run_id)


def _worker_gone(dep: Deployment, run_id: str, shard_id: str, attempt: int) -> str | None:
    """The worker of a running attempt, if it is gone (no instance, no lease)."""
    try:
        status = json.loads(dep.backends.store.get(Layout.status(run_id, shard_id, attempt)))
    except (CFlowError, ValueError):
        return None
    if status.get("state") != "running":
        return None
    worker = str(status.get("worker", ""))
    names, leases = _live_workers(dep, run_id)
    if worker in names or (leases is not None and leases.get(shard_id) == worker):
        return None
    return worker


def _attempt_over(store: Store, run_id: str, shard_id: str, attempt: int) -> bool:
    if store.exists(Layout.result(run_id, shard_id)):
        return True
    try:
        state = json.loads(store.get(Layout.status(run_id, shard_id, attempt)))["state"]
    except CFlowError:
        return False
    return bool(state != "running")


@app.command()
def cancel(
    run_id: RunArg,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Stop a run: queued shards are dropped, running ones stopped."""
    with _deployment(local, store, deployment) as dep:
        dropped = runs.cancel(dep.backends.store, dep.backends.queue, run_id)
    dropped_note = (
        f"{dropped} queued shards dropped" if dropped else "workers drop its queued shards"
    )
    err.print(f"cflow: run {run_id} cancelled ({dropped_note}; running ones stop within a minute)")


@app.command()
def retry(
    run_id: RunArg,
    failed_only: Annotated[
        bool, typer.Option("--failed", help="Re-enqueue the failed shards.")
    ] = False,
    workers: WorkersOpt = None,
    slots: SlotsOpt = None,
    detach: Annotated[bool, typer.Option("--detach")] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Re-run the failed (or unfinished) shards of a run; committed shards stay as they are."""
    if not failed_only:
        raise _fail("say what to retry: `runner retry RUN --failed`")
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        interrupted = runs.load_manifest(st, run_id)
        if interrupted.state == RunState.ACTIVE.value and interrupted.publishing:
            # Nothing failed yet: the submit was cut off. Finish it, as `runner watch` would.
            interrupted = _resume_publishing(dep, interrupted)
            watcher = _watcher(
                dep, interrupted, workers=workers, slots=slots, shards=interrupted.shard_count
            )
            if detach:
                watcher.poll()
                return
            raise typer.Exit(
                _watch_and_finish(watcher, dep, cancel_on_interrupt=False, out_dir=None)
            )
        retried = runs.retry(st, dep.backends.queue, run_id)
        if not retried:
            err.print(f"cflow: run {run_id} has no failed shards; nothing to retry")
            return
        err.print(f"cflow: retrying {len(retried)} shards of run {run_id}")
        manifest = runs.mark_published(st, runs.load_manifest(st, run_id))
        watcher = _watcher(dep, manifest, workers=workers, slots=slots, shards=len(retried))
        if detach:
            watcher.poll()
            return
        code = _watch_and_finish(watcher, dep, cancel_on_interrupt=False, out_dir=None)
    raise typer.Exit(code)


@app.command()
def combine(
    run_id: RunArg,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Also copy the result here.")
    ] = None,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Combine the committed outputs of a run (again)."""
    with _deployment(local, store, deployment) as dep:
        st = dep.backends.store
        manifest = runs.load_manifest(st, run_id)
        result = combine_run(st, manifest, out=out_dir)
    for key in result.files:
        out.print(st.url(key))
    if result.missing:
        err.print(f"cflow: [yellow]{result.missing} shards have no committed output[/yellow]")


@app.command("runs")
def list_runs(
    local: LocalOpt = False, store: StoreOpt = None, deployment: DeploymentOpt = None
) -> None:
    """List runs, oldest first."""
    with _deployment(local, store, deployment) as dep:
        listing = runs.scan_runs(dep.backends.store)
        manifests = listing.manifests
        done = {m.run_id: len(runs.committed(dep.backends.store, m.run_id)) for m in manifests}
    for url, problem in listing.broken.items():
        err.print(f"cflow: [red]broken run:[/red] {url} ({problem})")
    if not manifests:
        if not listing.broken:
            err.print("cflow: no runs yet")
        return
    now = time.time()
    shown = [dataclasses.replace(m, state=runs.shown_state(m, now)) for m in manifests]
    out.print(report.runs_table(shown, done))


@app.command()
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Check the deployment: credentials, bucket, topics, subscriptions and instance group."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    if cfg.is_local:
        err.print(f"cflow: {cfg.describe()}; no Google Cloud deployment to check")
        return
    from runner.doctor import Check, run_checks  # the cloud clients load only when needed

    err.print(f"cflow: checking {cfg.describe()}")

    def show(check: Check) -> None:
        mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        err.print(f"  {mark} {check.name}: {check.detail}")

    checks = run_checks(cfg, on_check=show)
    if as_json:
        out.print_json(json.dumps([c.to_dict() for c in checks]))
    failed = [c for c in checks if not c.ok]
    if failed:
        err.print(f"cflow: {len(failed)} of {len(checks)} checks failed; fix them and run again")
        raise typer.Exit(EXIT_FAILED)
    err.print("cflow: the deployment is ready")
