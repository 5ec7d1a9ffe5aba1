"""What every ``runner`` command shares: the app, consoles, options, exit codes, helpers.

stdout carries what scripts capture (the run id, JSON, where a result went); narration and
progress go to stderr. Exit codes, one meaning each:

- 0: every shard succeeded, or the runner detached on purpose (``--detach``, Ctrl-C);
- 1: a shard failed, or the run was cancelled or halted, or ``combine`` of an unfinished run;
- 2: bad input or configuration (one line on stderr says what to fix).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from runner import config as config_mod
from runner import finish
from runner.backends.factory import open_deployment
from runner.cli import progress
from runner.engine.deployment import Deployment
from runner.engine.watch import Snapshot, Watcher
from runner.finish import Ending, Outcome
from runner.results.custom import CombineFailed
from runner.results.parts import OutTarget
from worker.agent.halt_rule import HaltRule
from worker.errors import CFlowError
from worker.protocol import is_valid_run_id

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
# Where a combined result also goes: submit's and combine's --out.
OutOpt = Annotated[
    str | None,
    typer.Option(
        "--out", help="Also write the combined result here (a folder or gs://BUCKET/PATH)."
    ),
]
# combine's own
HeadersOpt = Annotated[
    bool | None,
    typer.Option(
        "--headers/--no-headers",
        help="CSV/TSV parts start with a header: keep it once [default: cflow.toml].",
    ),
]
CombineTaskOpt = Annotated[
    Path | None,
    typer.Option(
        "--task", help="Combine as this (fixed) task folder says: its combine(), cflow.toml."
    ),
]
ReplaceOpt = Annotated[
    bool, typer.Option("--force", help="Replace another run's result in --out DIR.")
]
# report's own
ReportOutOpt = Annotated[
    Path | None,
    typer.Option("--out", help="Write here: .html (page with the picture), .png, .pdf, .svg."),
]
PriceAsOpt = Annotated[
    str | None,
    typer.Option("--machine-type", help="Price workers of unknown type as this VM type."),
]
PricesOpt = Annotated[
    Path | None,
    typer.Option(
        "--prices", envvar="CFLOW_PRICES", help="TOML/JSON price overrides (USD per hour)."
    ),
]
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def duration(value: str | float) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``1h`` or ``1h30m``; typer.BadParameter (one line)
    for anything else."""
    if isinstance(value, int | float):  # the option's default
        return float(value)
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.fullmatch(text)
        if not text or match is None:
            raise typer.BadParameter(
                f"{value!r} is not a duration; write seconds (90) or 90s, 15m, 1h, 1h30m"
            ) from None
        h, m, s = (float(g or 0) for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(f"{value!r} is no time to run; give e.g. 90s, 15m or 1h")
    return seconds


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
    """The deployment the shared options name, open for the command and closed after it."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    _refuse_no_folder(cfg)
    dep = open_deployment(cfg)
    try:
        yield dep
    finally:
        dep.close()


def store_exists(local: bool, store: Path | None, deployment: Path | None) -> bool:
    """False for a local store folder that does not exist: reading it must not create it."""
    cfg = config_mod.resolve(local=local, store_dir=store, deployment_file=deployment)
    _refuse_no_folder(cfg)
    return not cfg.is_local or cfg.store_dir.is_dir()


def _refuse_no_folder(cfg: config_mod.Config) -> None:
    """A local store that is a file (``CFLOW_STORE`` set to one) is a mistake to name, not a
    store with no runs yet."""
    path = cfg.store_dir
    if cfg.is_local and path.exists() and not path.is_dir():
        raise fail(f"the store {path} is not a folder; pass --store DIR or set CFLOW_STORE")


def need_run(run_id: str, local: bool, store: Path | None, deployment: Path | None) -> None:
    """Refuse a malformed run id, or any run id where there is no store (creating none)."""
    if not is_valid_run_id(run_id):
        raise fail(f"{run_id!r} is not a run id; `runner runs` lists them")
    if not store_exists(local, store, deployment):
        raise fail(f"no run {run_id}: there is no store here; `runner runs` lists runs")


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Say what is wrong in one line; the caller raises the exit returned."""
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def say(message: str) -> None:
    """Narration: one line on stderr."""
    err.print(f"cflow: {message}", markup=False)


def live(watcher: Watcher, poll_seconds: float) -> Snapshot:
    """Watch with the live progress display on stderr."""
    return progress.watch_live(watcher, poll_seconds, err)


def follow_to_end(
    watcher: Watcher,
    dep: Deployment,
    *,
    rule: HaltRule,
    cancel_on_interrupt: bool,
    out: OutTarget | None,
) -> int:
    """Watch a run to its end with live progress, finish it, and say how it went: the exit code."""
    outcome = finish.watch_and_finish(
        watcher,
        dep,
        rule=rule,
        cancel_on_interrupt=cancel_on_interrupt,
        out=out,
        display=live,
        on_outcome=show_outcome,
        say=say,
    )
    return exit_code(outcome)


def exit_code(outcome: Outcome) -> int:
    """0 when every shard succeeded and was combined, or the runner detached; else 1."""
    return EXIT_OK if outcome.ok else EXIT_FAILED


def show_outcome(outcome: Outcome) -> None:
    """The closing lines of a watched run on stderr."""
    run_id = outcome.run_id
    if outcome.ending is Ending.DETACHED and outcome.unpublished is not None:
        done, total = outcome.unpublished
        err.print(
            f"\ncflow: detached while publishing: run {run_id} goes on with {done} of its"
            f" {total} shards published; `runner watch {run_id}` publishes the rest and"
            f" watches it; stop it: `runner cancel {run_id}`",
            markup=False,
        )
    elif outcome.ending is Ending.DETACHED:
        err.print(
            f"\ncflow: detached; run {run_id} goes on. Re-attach: `runner watch {run_id}`;"
            f" stop it: `runner cancel {run_id}`",
            markup=False,
        )
    elif outcome.interrupted:
        err.print(f"\ncflow: run {run_id} cancelled", markup=False)
    elif outcome.ending is Ending.HALTED:
        say(f"run {run_id} halted: {outcome.halted}")
        err.print(
            f"  fix the task, then `runner retry {run_id} --failed --task DIR`"
            " (or submit with --halt never)",
            markup=False,
        )
    elif outcome.ending is Ending.CANCELLED:
        say(f"run {run_id} was cancelled")
    elif outcome.snapshot is not None:
        progress.summary(outcome.snapshot, outcome.files, outcome.written, outcome.failed, err)
        if outcome.combine_error is not None:
            show_combine_error(run_id, outcome.combine_error)


def show_combine_error(run_id: str, error: CFlowError) -> None:
    """Why combining failed: the task's traceback when its combine() raised, then one line
    with what to do."""
    if isinstance(error, CombineFailed):
        if error.traceback:
            err.print(error.traceback.rstrip("\n"), markup=False)
        advice = error.advice()
    else:
        advice = f"the shards' outputs are kept, fix it and run `runner combine {run_id}`"
    err.print(f"error: combining run {run_id} failed: {error}; {advice}", markup=False)
