"""``runner status``, ``logs``, ``combine``, ``runs``, ``doctor``, ``report``: looking at runs."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from runner import config as config_mod
from runner.cli import progress
from runner.cli.common import (
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    CombineTaskOpt,
    DeploymentOpt,
    HeadersOpt,
    JsonOpt,
    LocalOpt,
    OutOpt,
    PriceAsOpt,
    PricesOpt,
    ReplaceOpt,
    ReportOutOpt,
    RunArg,
    StoreOpt,
    app,
    err,
    need_run,
    open_dep,
    out,
    say,
    show_combine_error,
    store_exists,
)
from runner.cli.run import DiskGbOpt, FallbackOpt, GpuOpt, MachineTypeOpt, ProvisioningOpt
from runner.engine import runs
from runner.engine.cache import cached_count
from runner.engine.deployment import Check, Deployment
from runner.engine.listing import UNFINISHED, scan_runs, shown_state, unfinished
from runner.engine.reports import flag_lost, iter_shard_reports
from runner.finish import combine_where_data_is, live_workers, worker_gone
from runner.results.custom import CombineFailed
from runner.results.parts import check_out, outside_store
from worker.errors import CFlowError, NotFound
from worker.protocol import Manifest, RunOptions, ShardState


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
    need_run(run_id, local, store, deployment)
    wanted = set(state or [])
    with open_dep(local, store, deployment) as dep:
        st = dep.backends.store
        manifest = runs.load_manifest(st, run_id)
        reports = flag_lost(iter_shard_reports(st, manifest), lambda: live_workers(dep, run_id))
        if wanted:
            reports = (r for r in reports if r.state in wanted)
        if as_json:
            progress.stream_status_json(manifest, reports, sys.stdout)
            return
        rows = list(reports)
        problems = _fleet_problems(dep)
    counts = {s.value: 0 for s in ShardState}
    for r in rows:
        counts[r.state.value] += 1
    out.print(progress.status_table(manifest, rows), crop=False)
    if cached := sum(1 for r in rows if r.cached_from):
        counts["cached"] = cached  # of the succeeded, reused from earlier runs
    out.print(" · ".join(f"{v} {k}" for k, v in counts.items() if v or not wanted))
    for line in problems:
        err.print(f"cflow: warning: {line}", markup=False)


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
    worker: Annotated[
        str | None,
        typer.Option(
            "--worker", help="Print this worker's own agent log instead (kept after a VM is gone)."
        ),
    ] = None,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Print a shard's log (without --shard: where each shard's latest log is)."""
    need_run(run_id, local, store, deployment)
    with open_dep(local, store, deployment) as dep:
        from runner.observe.logs import LogEnd, read_log, where_logs

        st = dep.backends.store
        if worker is not None:
            sys.stdout.buffer.write(_agent_log(dep, worker))
            sys.stdout.flush()
            return
        manifest = runs.load_manifest(st, run_id)
        if shard is None:
            for line in where_logs(st, manifest):
                sys.stdout.write(line + "\n")
            return
        end = read_log(
            st,
            manifest,
            shard,
            attempt=attempt,
            follow=follow,
            write=_write_out,
            say=say,
            gone=lambda shard_id, number: worker_gone(dep, run_id, shard_id, number),
        )
    raise typer.Exit(EXIT_FAILED if end is LogEnd.NEVER_RAN else EXIT_OK)


def _write_out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@app.command()
def combine(
    run_id: RunArg,
    out_dir: OutOpt = None,
    headers: HeadersOpt = None,
    task_dir: CombineTaskOpt = None,
    force: ReplaceOpt = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Combine the committed outputs of a run (again). Prints where each file went."""
    need_run(run_id, local, store, deployment)
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    target = check_out(out_dir, cloud=not cfg.is_local, run_id=run_id, force=force)
    if cfg.is_local:
        target = outside_store(cfg.store_dir, run_id, target)
    with open_dep(local, store, deployment) as dep:
        st = dep.backends.store
        manifest = runs.load_manifest(st, run_id)
        try:
            result = combine_where_data_is(
                dep, manifest, out=target, headers=headers, say=say, task=task_dir
            )
        except CombineFailed as exc:
            show_combine_error(run_id, exc)
            raise typer.Exit(EXIT_FAILED) from None
    for where in result.written or [st.url(k) for k in result.files]:
        out.print(where, markup=False)
    if result.files:
        say(f"combined {len(result.files)} files from {result.shards} shards")
    else:
        say(f"run {run_id} has no outputs to combine ({result.shards} committed shards wrote none)")
    if not cfg.is_local:
        say(f"runner traffic: {json.dumps(result.traffic.to_dict())}")
    if result.missing:
        settled = len(runs.failed(st, run_id)) + result.shards
        unfinished = manifest.shard_count - settled
        say(
            f"{result.missing} of {manifest.shard_count} shards have no committed output"
            f" ({unfinished} not finished; see `runner status {run_id}`); the result is partial"
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
    cached: dict[str, int] = {}
    broken: dict[str, str] = {}
    if store_exists(local, store, deployment):
        with open_dep(local, store, deployment) as dep:
            listing = scan_runs(dep.backends.store)
            manifests, broken = listing.manifests, listing.broken
            done = {m.run_id: len(runs.committed(dep.backends.store, m.run_id)) for m in manifests}
            cached = {m.run_id: cached_count(dep.backends.store, m.run_id) for m in manifests}
    for url, problem in broken.items():
        err.print(f"cflow: broken run: {url} ({problem})", markup=False)
    if as_json:
        sys.stdout.write(
            json.dumps([progress.run_dict(m, done[m.run_id], cached[m.run_id]) for m in manifests])
            + "\n"
        )
        return
    if not manifests:
        if not broken:
            err.print("cflow: no runs yet")
        return
    # A run cut off while publishing shows as such (`runner watch` finishes it).
    now = time.time()
    shown = [dataclasses.replace(m, state=shown_state(m, now, done[m.run_id])) for m in manifests]
    out.print(progress.runs_table(shown, done, cached), crop=False)
    for m in shown:
        if m.state == UNFINISHED:
            err.print(f"cflow: {unfinished(m.run_id)}", markup=False)


@app.command()
def doctor(
    as_json: JsonOpt = False,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
    machine_type: MachineTypeOpt = None,
    gpu: GpuOpt = None,
    disk_gb: DiskGbOpt = None,
    provisioning: ProvisioningOpt = None,
    fallback: FallbackOpt = None,
) -> None:
    """Check the backend: locally the store and bash; in the cloud credentials, APIs, bucket,
    topics, subscriptions, grants, instance group, quotas, images and (with submit's shape
    flags) the machine shape a run would ask for."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    shaped = (machine_type, gpu, disk_gb, provisioning, fallback) != (None,) * 5
    options = RunOptions(
        machine_type=machine_type,
        gpu=gpu,
        disk_gb=disk_gb,
        provisioning=provisioning,
        fallback=fallback,
    )
    checks: list[Any]
    if cfg.is_local:
        from runner.backends.local.doctor import local_checks

        checks = local_checks(cfg)
    else:
        from runner.backends.gcp.doctor import (  # the cloud clients load only when needed
            run_checks,
        )

        err.print(f"cflow: checking {cfg.describe()}", markup=False)

        def show(check: Check) -> None:
            mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
            err.print(f"  {mark} {check.name}: {check.detail}")

        checks = run_checks(cfg, on_check=show, options=options if shaped else None)
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


@app.command("report")
def report_cmd(
    run_id: RunArg,
    out_file: ReportOutOpt = None,
    machine_type: PriceAsOpt = None,
    prices_file: PricesOpt = None,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """A picture of what happened: a lane per worker, attempts by outcome, queue depth, cost."""
    from runner.observe.prices import load_prices  # matplotlib loads only for this command
    from runner.observe.render import check_report_out, render, summary_rows
    from runner.observe.timeline import build_timeline

    target = check_report_out(out_file or Path(f"{run_id}-report.html"))
    table = load_prices(prices_file)
    with open_dep(local, store, deployment) as dep:
        timeline = build_timeline(
            dep.backends.store, run_id, prices=table, machine_type=machine_type
        )
    rendered = render(timeline, target)
    for label, value in summary_rows(timeline):
        err.print(f"  {label:>15}: {value}", markup=False)
    err.print(f"cflow: picture {rendered.picture}, data {rendered.sidecar}", markup=False)
    out.print(str(rendered.html or rendered.picture))


def _fleet_problems(dep: Deployment) -> list[str]:
    """In the cloud, what the group reports wrong now (VMs that cannot start or boot)."""
    if dep.config.is_local:
        return []
    fleet = dep.fleet()
    try:
        fleet.instances()  # one listing, which reads each VM's creation errors
        return fleet.problems()
    except CFlowError:
        return []


def _agent_log(dep: Deployment, worker: str) -> bytes:
    if dep.config.is_local:
        path = dep.config.store_dir / "fleet" / "logs" / f"{worker}.log"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no log of worker {worker} at {path}") from None
    from runner.backends.gcp.fleet import agent_log

    return agent_log(dep.backends.store, worker)  # type: ignore[arg-type]
