"""How the runner shows a run: the progress line, the summary, the tables and the JSON.

On a terminal the progress is a live bar; without one (CI, ``nohup``, ``2>log``) it is one plain
line every :data:`PLAIN_EVERY` seconds, never wrapped. Tables never cut an id.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn
from rich.table import Table
from rich.text import Text

from runner.engine.reports import ShardReport
from runner.engine.watch import Snapshot, Watcher
from worker.protocol import Event, EventKind, Manifest, ShardState

PLAIN_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal
REASONS_SHOWN = 5  # failed shards named in the summary


class RunClock:
    """How long the run (its latest round: a retry's) has been going, not this watch: from the
    round's start to now, or, for a run that had ended before it was watched, to the last
    settlement the watch heard of. The watcher's events pass through :meth:`heard`."""

    SETTLED = frozenset({EventKind.SUCCEEDED.value, EventKind.FAILED.value})

    def __init__(self, watcher: Watcher):
        manifest = watcher.manifest
        self.since = float(manifest.bundles[-1]["at"]) if manifest.bundles else manifest.created_at
        self.last_settled: float | None = None
        self.ended_unwatched: bool | None = None  # known at the first snapshot
        passed_on = watcher.on_event

        def heard(event: Event) -> None:
            if event.kind in self.SETTLED and event.at >= self.since:
                self.last_settled = max(self.last_settled or event.at, event.at)
            if passed_on is not None:
                passed_on(event)

        watcher.on_event = heard

    def elapsed(self) -> float:
        """Seconds the run has been going (or went, if it had ended before the watch)."""
        end = time.time()
        if self.ended_unwatched and self.last_settled is not None:
            end = self.last_settled
        return max(end - self.since, 0.0)

    def timed(self, s: Snapshot) -> Snapshot:
        """``s`` with the run's elapsed time in place of the watch's."""
        if self.ended_unwatched is None:
            self.ended_unwatched = s.finished
        return dataclasses.replace(s, elapsed=self.elapsed())


class _RunElapsed(ProgressColumn):
    """The live bar's clock: the run's elapsed time, ticking between polls."""

    def __init__(self, clock: RunClock):
        super().__init__()
        self.clock = clock

    def render(self, task: Any) -> Text:
        return Text(duration(self.clock.elapsed()))


def watch_live(watcher: Watcher, poll_seconds: float, err: Console) -> Snapshot:
    """Watch a run to its end, with progress on ``err``; the snapshot returned counts the
    run's time (:class:`RunClock`)."""
    clock = RunClock(watcher)
    if not err.is_terminal:
        return clock.timed(_watch_plain(watcher, poll_seconds, err, clock.timed))
    columns = (
        BarColumn(bar_width=24),
        TextColumn(
            "{task.completed:.0f}/{task.total:.0f} done{task.fields[cached]}"
            " · [red]{task.fields[failed]} failed[/red]"
            " · {task.fields[running]} running · {task.fields[queued]} queued"
            " · {task.fields[workers]} workers · {task.fields[rate]} · ETA {task.fields[eta]}"
            "{task.fields[note]}"
        ),
        _RunElapsed(clock),
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
            note="",
            cached="",
        )

        def update(s: Snapshot) -> None:
            s = clock.timed(s)
            problems = fleet_problems(watcher)
            progress.update(
                bar,
                completed=s.succeeded + s.failed,
                failed=s.failed,
                running=s.running,
                queued=s.queued,
                workers=s.workers,
                rate=f"{s.rate:.1f}/s" if s.rate else "-",
                eta=duration(s.eta) if s.eta is not None else "-",
                note=f" · [yellow]{escape('; '.join(problems))}[/yellow]" if problems else "",
                cached=f" ({s.cached} cached)" if s.cached else "",
            )

        return clock.timed(watcher.watch(on_update=update, poll_seconds=poll_seconds))


def fleet_problems(watcher: Watcher) -> list[str]:
    """What the fleet found wrong at its last look (VMs that cannot start, failed boots)."""
    if watcher.fleet is None:
        return []
    try:
        return watcher.fleet.problems()
    except Exception:  # the progress line never fails a run
        return []


def progress_line(s: Snapshot) -> str:
    """One self-contained line of progress, for logs."""
    rate = f"{s.rate:.1f}/s" if s.rate else "-"
    eta = duration(s.eta) if s.eta is not None else "-"
    return (
        f"cflow: run {s.run_id}: {s.succeeded + s.failed}/{s.total} done{_cached(s.cached)},"
        f" {s.failed} failed,"
        f" {s.running} running, {s.queued} queued, {s.workers} workers, {rate}, ETA {eta},"
        f" {duration(s.elapsed)} elapsed"
    )


def _watch_plain(
    watcher: Watcher, poll_seconds: float, err: Console, timed: Callable[[Snapshot], Snapshot]
) -> Snapshot:
    last = float("-inf")
    said: list[str] = []

    def update(s: Snapshot) -> None:
        nonlocal last, said
        s = timed(s)
        now = time.monotonic()
        if now - last >= PLAIN_EVERY or s.finished:
            last = now
            err.print(progress_line(s), markup=False, soft_wrap=True)
        problems = fleet_problems(watcher)
        if problems != said:  # each new problem once, as it appears
            for line in problems:
                if line not in said:
                    err.print(f"cflow: warning: {line}", markup=False, soft_wrap=True)
            said = problems

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
    s: Snapshot,
    files: Iterable[str] | None,
    written: Iterable[str],
    failed: list[ShardReport],
    err: Console,
) -> None:
    """The closing lines of a run: counts, where the result is, why shards failed.

    ``files`` is None when the combine did not happen (it failed; the caller says why).
    """
    colour = "red" if s.failed else "green"
    err.print(
        f"cflow: [{colour}]{s.succeeded}/{s.total} shards succeeded{_cached(s.cached)},"
        f" {s.failed} failed[/{colour}]"
        f" in {duration(s.elapsed)} ({s.preempted} preempted, {s.retried} retried)"
    )
    combined, written = list(files or []), list(written)
    for key in combined:
        err.print(f"  combined: {key}", markup=False)
    for where in written:
        err.print(f"  written: {where}", markup=False)
    if files is not None and not combined and s.succeeded:
        err.print("  no outputs: no committed attempt wrote a file, nothing to combine")
    for r in failed[:REASONS_SHOWN]:
        err.print(f"  failed {r.id}: {reason_of(r)}", markup=False)
    if len(failed) > REASONS_SHOWN:
        err.print(f"  ... and {len(failed) - REASONS_SHOWN} more failed shards")
    if s.failed:
        err.print(
            f"  see `runner status {s.run_id} --state failed` and `runner logs {s.run_id} --shard"
            f" ID`; after a fix: `runner retry {s.run_id} --failed --task DIR`",
            markup=False,
        )


def _cached(count: int) -> str:
    return f" ({count} cached)" if count else ""


def reason_of(r: ShardReport) -> str:
    """Why a shard is where it is: its failure, else its latest attempt's reason."""
    if r.failure is not None:
        return r.failure.reason
    if r.attempts and r.attempts[-1].reason:
        return str(r.attempts[-1].reason)
    return ""


def status_table(manifest: Manifest, reports: list[ShardReport]) -> Table:
    """One row per shard: state, attempts, duration, exit code, input or failure reason."""
    id_width = max((len(r.id) for r in reports), default=5)
    title = f"run {manifest.run_id} ({manifest.state})"
    if manifest.halted:
        title += f" halted: {escape(manifest.halted)}"
    table = Table(title=title, title_justify="left")
    table.add_column("shard", no_wrap=True, min_width=id_width)
    for col in ("state", "attempts", "duration", "exit"):
        table.add_column(col, no_wrap=True)
    table.add_column("input / reason", overflow="fold")
    for r in reports:
        colour = {"succeeded": "green", "failed": "red", "running": "yellow"}.get(r.state.value, "")
        shown = "cached" if r.cached_from else r.state.value
        table.add_row(
            r.id,
            f"[{colour}]{shown}[/{colour}]" if colour else shown,
            str(len(r.attempts)),
            f"{r.duration:.1f}s" if r.duration is not None and not r.cached_from else "",
            "" if r.exit_code is None else str(r.exit_code),
            escape(
                (reason_of(r) if r.state is not ShardState.SUCCEEDED else r.input) or r.input or ""
            ),
        )
    return table


def runs_table(
    manifests: list[Manifest], committed: dict[str, int], cached: dict[str, int] | None = None
) -> Table:
    """One row per run: state, committed shards of all (and how many reused from earlier
    runs), when, which task."""
    table = Table()
    table.add_column(
        "run", no_wrap=True, min_width=max((len(m.run_id) for m in manifests), default=3)
    )
    for col in ("state", "shards", "created", "task"):
        table.add_column(col, no_wrap=True)
    for m in manifests:
        table.add_row(
            m.run_id,
            m.state + (" (halted)" if m.halted else ""),
            f"{committed.get(m.run_id, 0)}/{m.shard_count}"
            + _cached((cached or {}).get(m.run_id, 0)),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_at)),
            escape(m.task_name),
        )
    return table


def run_dict(m: Manifest, committed: int, cached: int = 0) -> dict[str, Any]:
    """A run as ``runner runs --json`` shows it (``cached``: of the committed, how many were
    reused from earlier runs)."""
    return {
        "run_id": m.run_id,
        "state": m.state,
        "halted": m.halted,
        "shards": m.shard_count,
        "committed": committed,
        "cached": cached,
        "created_at": m.created_at,
        "task": m.task_name,
        "bundle": m.bundle,
    }


def stream_status_json(
    manifest: Manifest, reports: Iterator[ShardReport], out: IO[str]
) -> dict[str, int]:
    """Write ``status --json`` one shard at a time (a 100,000-shard run never sits in memory).

    The object's keys: run_id, state, halted, created_at, shards (the list), counts.
    """
    counts = {state.value: 0 for state in ShardState}
    head = {
        "run_id": manifest.run_id,
        "state": manifest.state,
        "halted": manifest.halted,
        "created_at": manifest.created_at,
    }
    out.write(json.dumps(head)[:-1] + ', "shards": [')
    first = True
    counts["cached"] = 0
    for r in reports:
        counts[r.state.value] += 1
        counts["cached"] += bool(r.cached_from)
        out.write(("\n" if first else ",\n") + json.dumps(r.to_dict()))
        first = False
    out.write(f'\n], "counts": {json.dumps(counts)}}}\n')
    return counts
