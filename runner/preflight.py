"""What a submit does before its run exists: the checks said, the store checked writable,
the local workers a run is sure to need started early (and taken back when the task cannot
start), and a dry run's listing. :mod:`runner.submit` calls these in order."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

from runner.config import Config
from runner.engine.checks import CheckReport
from runner.engine.deployment import Deployment
from runner.engine.fleet import Fleet
from runner.engine.plan import dry_run
from runner.results.parts import Say
from worker.errors import ConfigError

if TYPE_CHECKING:
    from runner.submit import SubmitRequest


def check_writable(folder: Path, what: str, fix: str = "") -> None:
    """Raise ConfigError unless ``folder`` can be made (or is there) and written: a file is
    made and removed in it, or in its nearest existing parent (a read-only mount, ``/proc``)."""
    parent = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    if not parent.is_dir():
        raise ConfigError(f"{what} {folder}: {parent} is not a folder{fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cflow-probe-", dir=parent)
    except OSError as exc:
        raise ConfigError(
            f"{what} {folder}: {parent} is not writable ({exc.strerror}){fix}"
        ) from None
    os.close(fd)
    os.unlink(probe)


def narrate(checked: CheckReport, say: Say) -> None:
    checked.finish()  # raises TaskError with the task's own last line
    for note in checked.notes:
        say(note)
    checked.notes.clear()  # said once


def undo_early(fleet: Fleet, early: list[str], cfg: Config, store_was_there: bool) -> None:
    """A submit that fails its task check leaves nothing: the workers it started go, and so
    does the store it created (when no run has reached it)."""
    if early:
        fleet.delete(early)
        fleet.wait_empty(10.0)
    runs_dir = cfg.store_dir / "runs"
    if cfg.is_local and not store_was_there and not (runs_dir.exists() and any(runs_dir.iterdir())):
        shutil.rmtree(cfg.store_dir, ignore_errors=True)


def early_workers(request: SubmitRequest, workers: int) -> int:
    """How many of its ``workers`` a run starts before it is made: those it is sure to need
    (its shards, where known before they are read, else one). None when detached, or with the
    cache: a rerun that reuses every shard needs none, and the reuse wants the cores."""
    if request.detach or request.cache:
        return 0
    shards = request.known_shards()
    return min(workers, shards if shards is not None else 1)


def start_early(fleet: Fleet, dep: Deployment, count: int) -> list[str]:
    """On the local backend, start the ``count`` workers a run is sure to need (less those
    there already) before it is made."""
    if not dep.config.is_local:
        return []
    wanted = count - len(fleet.instances())
    return fleet.grow(wanted) if wanted > 0 else []


def dry_run_plan(
    request: SubmitRequest,
    cfg: Config,
    say: Say,
    opener: Callable[[Config], Deployment],
    listing: IO[str],
) -> None:
    """Shards on ``listing``, one a line; what would start is said. Nothing is created."""
    inputs = request.gather_inputs()
    task_dir, workers, slots = request.task_dir, request.workers, request.slots
    if inputs is not None and inputs.remote:  # listing the bucket needs the deployment's client
        dep = opener(cfg)
        try:
            source = request.shard_source(dep.lister, say)
            plan = dry_run(cfg, task_dir, source, workers, slots, listing)
        finally:
            dep.close()
    else:
        plan = dry_run(cfg, task_dir, request.shard_source(say=say), workers, slots, listing)
    say(f"dry run: {plan}; nothing was started")
