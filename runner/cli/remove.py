"""``runner cancel``, ``rm`` and ``prune``: stopping runs and deleting them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer

from runner.cli.common import (
    DeploymentOpt,
    LocalOpt,
    RunArg,
    StoreOpt,
    app,
    err,
    need_run,
    open_dep,
    out,
    store_exists,
)
from runner.engine import runs
from runner.engine.listing import UNFINISHED, scan_runs, shown_state, unfinished
from runner.finish import cancel_run
from worker.protocol import RunState

if TYPE_CHECKING:
    from runner.engine.deployment import Deployment
    from runner.engine.prune import Removed


@app.command()
def cancel(
    run_id: RunArg,
    local: LocalOpt = False,
    store: StoreOpt = None,
    deployment: DeploymentOpt = None,
) -> None:
    """Stop a run: queued shards are dropped; waits for the running ones to stop (locally)."""
    need_run(run_id, local, store, deployment)
    with open_dep(local, store, deployment) as dep:
        manifest = runs.load_manifest(dep.backends.store, run_id)
        if manifest.state != RunState.ACTIVE.value:
            over = "halted" if manifest.halted else manifest.state
            err.print(f"cflow: run {run_id} is {over} already: nothing to cancel", markup=False)
            return
        cancelled = cancel_run(dep, run_id)
    err.print(f"cflow: {cancelled.describe()}", markup=False)


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
    from runner.engine.prune import remove_runs

    for run_id in run_ids:
        need_run(run_id, local, store, deployment)
    with open_dep(local, store, deployment) as dep:
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
    from runner.engine.prune import older_than as pick
    from runner.engine.prune import parse_age, remove_runs

    age = parse_age(older_than)
    if not store_exists(local, store, deployment):
        err.print("cflow: no runs yet")
        return
    with open_dep(local, store, deployment) as dep:
        st = dep.backends.store
        old = pick(scan_runs(st).manifests, age, time.time())
        going = [m for m in old if m.state == RunState.ACTIVE.value]
        doomed = [m for m in old if m.state != RunState.ACTIVE.value]
        for m in going:
            if shown_state(m, time.time(), len(runs.committed(st, m.run_id))) == UNFINISHED:
                err.print(f"cflow: keeping {m.run_id}: {unfinished(m.run_id)}", markup=False)
            else:
                err.print(f"cflow: keeping {m.run_id}: it is still active (`runner rm --force`)")
        if dry:
            for m in doomed:
                out.print(m.run_id, markup=False)
        else:
            removed = remove_runs(st, dep.backends.queue, doomed)
            _removed_note(removed)
        if not dep.config.is_local:
            _prune_shapes(dep, dry=dry)


def _prune_shapes(dep: Deployment, *, dry: bool) -> None:
    """Shaped groups (and templates, work queues) no active run uses, once they are empty."""
    from runner.backends.gcp.shapes.apply import open_shapes
    from runner.backends.gcp.shapes.cleanup import cleanup_shapes

    shapes = open_shapes(dep)
    try:
        done = cleanup_shapes(shapes, scan_runs(dep.backends.store).manifests, dry=dry)
    finally:
        shapes.close()
    verb = "would delete" if dry else "deleted"
    for name in done.deleted:
        err.print(f"cflow: {verb} shaped group {name} (its template and work queue)", markup=False)
    for name, why in done.kept.items():
        err.print(f"cflow: keeping shaped group {name}: {why}", markup=False)


def _removed_note(removed: Removed) -> None:
    for run_id in removed.runs:
        out.print(run_id, markup=False)
    err.print(
        f"cflow: deleted {len(removed.runs)} runs ({removed.objects} objects,"
        f" {removed.messages} queued messages, {len(removed.bundles)} unused bundles);"
        f" freed {removed.bytes:,} bytes and {removed.cache_entries} cache entries"
        + (f"; {removed.workers} workers' logs went with their runs" if removed.workers else "")
        + (
            f"; {removed.empty_logs} empty logs of workers stopped before they began went too"
            if removed.empty_logs
            else ""
        ),
        markup=False,
    )
