"""How the runner shows a run: the live progress line, the summary and the status table."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from runner.runs import ShardReport
from runner.watch import Snapshot, Watcher
from worker.protocol import Manifest
from worker.store import Store


def watch_live(watcher: Watcher, poll_seconds: float, err: Console) -> Snapshot:
    """Watch a run to its end with a live progress line on ``err``."""
    columns = (
        BarColumn(bar_width=24),
        TextColumn(
            "{task.completed:.0f}/{task.total:.0f} done · [red]{task.fields[failed]} failed[/red]"
            " · {task.fields[running]} running · {task.fields[queued]} queued"
            " · {task.fields[workers]} workers · {task.fields[rate]} · ETA {task.fields[eta]}"
        ),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err, transient=False, refresh_per_second=4) as progress:
        bar = progress.add_task(
            watcher.run_id,
            total=watcher.manifest.shard_count,
            failed=0,
            running=0,
            queued=watcher.manifest.shard_count,
            workers=0,
            rate="-",
            eta="-",
        )

        def update(s: Snapshot) -> None:
            progress.update(
                bar,
                completed=s.succeeded + s.failed,
                failed=s.failed,
                running=s.running,
                queued=s.queued,
                workers=s.workers,
                rate=f"{s.rate:.1f}/s" if s.rate else "-",
                eta=duration(s.eta) if s.eta is not None else "-",
            )

        return watcher.watch(on_update=update, poll_seconds=poll_seconds)


def duration(seconds: float) -> str:
    """``75`` -> ``1m15s``."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def summary(
    s: Snapshot, files: list[str], store: Store, out_dir: Path | None, err: Console
) -> None:
    """The closing lines of a run: counts, where the result is, what to do about failures."""
    colour = "red" if s.failed else "green"
    err.print(
        f"cflow: [{colour}]{s.succeeded}/{s.total} shards succeeded, {s.failed} failed[/{colour}]"
        f" in {duration(s.elapsed)} ({s.preempted} preempted, {s.retried} retried)"
    )
    for key in files:
        err.print(f"  combined: {store.url(key)}")
    if out_dir is not None:
        err.print(f"  copied to: {out_dir}")
    if s.failed:
        err.print(
            f"  see `runner status {s.run_id}` and `runner logs {s.run_id} --shard ID`;"
            f" rerun failures with `runner retry {s.run_id} --failed`"
        )


def status_table(manifest: Manifest, reports: list[ShardReport]) -> Table:
    """One row per shard: state, attempts, duration, exit code, input or failure reason."""
    run_id = manifest.run_id
    table = Table(title=f"run {run_id} ({manifest.state})", title_justify="left")
    for col in ("shard", "state", "attempts", "duration", "exit", "input / reason"):
        table.add_column(col)
    for r in reports:
        colour = {"succeeded": "green", "failed": "red", "running": "yellow"}.get(r.state.value, "")
        table.add_row(
            r.id,
            f"[{colour}]{r.state.value}[/{colour}]" if colour else r.state.value,
            str(len(r.attempts)),
            f"{r.duration:.1f}s" if r.duration is not None else "",
            "" if r.exit_code is None else str(r.exit_code),
            (r.failure.reason if r.failure else r.input) or "",
        )
    return table


def runs_table(manifests: list[Manifest], committed: dict[str, int]) -> Table:
    """One row per run: state, committed shards of all, when, which task."""
    table = Table()
    for col in ("run", "state", "shards", "created", "task"):
        table.add_column(col)
    for m in manifests:
        table.add_row(
            m.run_id,
            m.state,
            f"{committed.get(m.run_id, 0)}/{m.shard_count}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at)),
            m.task_name,
        )
    return table
