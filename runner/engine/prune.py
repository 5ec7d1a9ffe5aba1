"""Deleting runs: their objects, their queue entries, and task bundles no other run uses.

A run still going is not deleted unless asked to (``force``); then it is cancelled first, so its
workers stop its attempts. On Pub/Sub, queued messages of a deleted run cannot be removed one by
one; workers drop them when they find no manifest for their run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runner.engine import cache, listing, reports, runs
from worker import defaults
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import ConfigError, NotFound, RunStateError
from worker.protocol import Layout, Manifest, RunState, ShardState
from worker.queue import WorkQueue
from worker.store import Store

# Seconds `rm --force` waits for a cancelled run's attempts to stop: they check for a cancel at
# each heartbeat, then get the preemption grace to exit.
STOP_WAIT = 2 * defaults.HEARTBEAT_SECONDS + defaults.PREEMPT_GRACE + 5
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
LIFETIME = "/lifetime.json"  # fleet/<worker>/lifetime.json (worker.agent.lifetime)
# An empty worker log this old with no lifetime record and no live entry is a worker that
# stopped before it began (its name's claim is given back after as long: the local registry).
EMPTY_LOG_SECONDS = 60.0


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s``, ``2w`` -> seconds; raises ConfigError."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ConfigError(f"--older-than {text!r} is not an age; write e.g. 7d, 12h, 30m or 90s")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Removed:
    runs: list[str]
    objects: int  # store objects deleted (the run's and unused bundles)
    messages: int  # queue entries dropped
    bundles: list[str]  # bundle hashes deleted
    bytes: int = 0  # what the deleted objects held
    cache_entries: int = 0  # the runs' entries in the cross-run cache's index (runner.engine.cache)
    workers: int = 0  # local workers of runs no longer kept whose log and lifetime record went
    empty_logs: int = 0  # empty logs of local workers stopped before they began (none of a run)


def bundles_of(manifest: Manifest) -> set[str]:
    """Every bundle a run used: the one it was submitted with and any it was retried with."""
    used = {manifest.bundle}
    for entry in getattr(manifest, "bundles", None) or []:
        used.add(str(entry["sha256"]))
    return used


def remove_runs(
    store: Store,
    queue: WorkQueue,
    manifests: Iterable[Manifest],
    *,
    force: bool = False,
    on_run: Callable[[str], None] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> Removed:
    """Delete each run; then every bundle that no remaining run uses."""
    doomed = list(manifests)
    for m in doomed:
        if m.state == RunState.ACTIVE.value and not force and not _over(store, m):
            raise RunStateError(
                f"run {m.run_id} is still going; `runner cancel {m.run_id}` first, or --force",
                run_id=m.run_id,
            )
    removed = Removed(runs=[], objects=0, messages=0, bundles=[])
    for m in doomed:
        if m.state == RunState.ACTIVE.value:
            removed.messages += runs.cancel(store, queue, m.run_id)
            # A running attempt that has not seen the cancel would write into the deleted run.
            _wait_stopped(store, queue, m.run_id, clock)
        removed.messages += queue.purge(m.run_id)
        # Later runs can no longer reuse this one's shards: its index entries go with it (the
        # shards other runs reused are their own copies, and stay).
        removed.cache_entries += cache.drop_index(store, m.run_id)
        removed.bytes += store.usage(Layout.run_prefix(m.run_id))[1]
        # The manifest goes last: a half-deleted run stays listed, and `rm` can finish it.
        keys = [
            k for k in store.list(Layout.run_prefix(m.run_id)) if k != Layout.manifest(m.run_id)
        ]
        for key in keys:
            store.delete(key)
        store.delete(Layout.manifest(m.run_id))
        folder = store.local_path(Layout.run_prefix(m.run_id).rstrip("/"))
        if folder is not None and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)  # the local store's empty folders
        removed.objects += len(keys) + 1
        removed.runs.append(m.run_id)
        if on_run is not None:
            on_run(m.run_id)
    in_use: set[str] = set()
    kept = listing.list_runs(store)
    for m in kept:
        in_use |= bundles_of(m)
    drop_workers(store, {m.run_id for m in kept}, removed)
    for key in list(store.list("tasks/", suffix=".tar.gz")):
        sha = key[len("tasks/") : -len(".tar.gz")]
        if sha not in in_use and sha in set().union(*(bundles_of(m) for m in doomed)):
            removed.bytes += store.usage(key)[1]
            store.delete(key)
            removed.objects += 1
            removed.bundles.append(sha)
    return removed


def drop_workers(store: Store, kept: set[str], removed: Removed) -> None:
    """Delete what the workers of runs no longer kept left in ``fleet/``: each one's log and
    lifetime record. A local worker serves one run and its lifetime record names it (a VM's
    serves every run and names none: kept); one still registered live is kept (it writes its
    record again as it stops, and a run being made has live workers before it is listed)."""
    live = store.local_path("fleet/live")
    recorded: set[str] = set()
    for key in list(store.list("fleet/", suffix=LIFETIME)):
        name = key[len("fleet/") : -len(LIFETIME)]
        recorded.add(name)
        if "/" in name or (live is not None and (live / f"{name}.json").exists()):
            continue
        try:
            run = json.loads(store.get(key)).get("run")
        except (NotFound, ValueError, AttributeError):
            continue
        if not isinstance(run, str) or run in kept:
            continue
        for gone in (key, f"fleet/logs/{name}.log"):
            count, size = store.usage(gone)
            if count:
                store.delete(gone)
                removed.objects += 1
                removed.bytes += size
        folder = store.local_path(f"fleet/{name}")
        if folder is not None:
            with contextlib.suppress(OSError):
                folder.rmdir()  # the local store's empty folder
        removed.workers += 1
    _drop_empty_logs(store, recorded, removed)


def _drop_empty_logs(store: Store, recorded: set[str], removed: Removed) -> None:
    """Delete the empty logs of local workers stopped before their agent began (a submit whose
    task cannot start stops the workers it started early): no lifetime record names their run,
    so none would go with one. A log with something in it stays (a worker that crashed as it
    started: it says why); so does one not yet :data:`EMPTY_LOG_SECONDS` old (a worker being
    started now) and one whose worker is registered live."""
    logs, live = store.local_path("fleet/logs"), store.local_path("fleet/live")
    if logs is None or live is None or not logs.is_dir():
        return  # only the local backend's workers leave logs there
    now = time.time()
    for entry in os.scandir(logs):
        name = entry.name.removesuffix(".log")
        if name == entry.name or name in recorded or (live / f"{name}.json").exists():
            continue
        with contextlib.suppress(OSError):
            info = entry.stat()
            if info.st_size == 0 and now - info.st_mtime >= EMPTY_LOG_SECONDS:
                os.unlink(entry.path)
                removed.empty_logs += 1
                removed.objects += 1


def _wait_stopped(store: Store, queue: WorkQueue, run_id: str, clock: Clock) -> None:
    """Wait (at most STOP_WAIT seconds) until no attempt of a cancelled run is running."""
    deadline = clock.monotonic() + STOP_WAIT
    while clock.monotonic() < deadline:
        leased = queue.stats(run_id).leased
        if leased == 0:
            return
        if leased is None and not any(
            r.state is ShardState.RUNNING
            for r in reports.iter_shard_reports(store, runs.load_manifest(store, run_id))
            if r.attempts and r.attempts[-1].state == "running"
        ):
            return
        clock.sleep(0.2)


def _over(store: Store, manifest: Manifest) -> bool:
    """An ``active`` run whose every shard committed or failed is over in all but name."""
    done = runs.committed(store, manifest.run_id) | runs.failed(store, manifest.run_id)
    return len(done) >= manifest.shard_count


def older_than(manifests: Iterable[Manifest], seconds: float, now: float) -> list[Manifest]:
    return [m for m in manifests if now - m.created_at > seconds]
