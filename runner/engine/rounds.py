"""A run's next round, and the halt rule it is judged by: ``runner retry`` re-enqueues the
shards that did not commit, once the attempts of the last round have stopped.

The run itself (its manifest, shard list and markers) is :mod:`runner.engine.runs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runner.engine.runs import (
    committed,
    failed,
    iter_shards,
    load_manifest,
    publish_all,
    update_manifest,
)
from worker.bundle import inspect_task, pack
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import RunStateError
from worker.protocol import Layout, Manifest, RunState, WorkMessage
from worker.queue import WorkQueue
from worker.store import Store


def retry(
    store: Store,
    queue: WorkQueue,
    run_id: str,
    *,
    task_dir: Path | None = None,
    halt: str | None = None,
    changes: Mapping[str, Any] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> list[str]:
    """Re-enqueue every shard of a finished or cancelled run that has not committed.

    Committed shards are left alone; each retried shard gets a fresh failure budget. The retry
    starts a new round of the run, recorded in the manifest's ``bundles`` (the bundle it runs,
    when, how many shards): the halt rule judges only the attempts of the round, and what is
    left on the queue from an earlier one is dropped where the backend can (workers drop the
    rest: every message names its round's bundle). With ``task_dir`` the folder is bundled
    anew and the retried shards run that bundle; ``halt`` records a new halt rule; ``changes``
    sets other run options from now on (``timeout``, ``max_attempts``).
    """
    manifest = load_manifest(store, run_id)
    done, failures = committed(store, run_id), failed(store, run_id)
    if manifest.state == RunState.ACTIVE.value and len(done) + len(failures) < manifest.shard_count:
        raise RunStateError(
            f"run {run_id} is still going; wait (`runner watch {run_id}`) or cancel it first",
            run_id=run_id,
        )
    todo = [s for s in iter_shards(store, run_id) if s.id not in done]
    if not todo:
        return []
    bundle, entry = manifest.bundle, manifest.entry
    if task_dir is not None and manifest.options.get("function"):
        raise RunStateError(
            f"run {run_id} maps a Python function (cflow), whose values a task folder cannot"
            f" give; retry it without --task (`runner retry {run_id} --failed`), or map the"
            " fixed function again (with cache=True the items done are reused)",
            run_id=run_id,
        )
    if task_dir is not None:
        entry = inspect_task(task_dir).entry.value
        data, bundle = pack(task_dir)
        if not store.exists(Layout.bundle(bundle)):
            store.put(Layout.bundle(bundle), data)
    history = list(manifest.bundles) or [
        {"sha256": manifest.bundle, "at": manifest.created_at, "shards": manifest.shard_count}
    ]
    history.append({"sha256": bundle, "at": clock.time(), "shards": len(todo)})
    options = {**manifest.options, **(changes or {})}
    options.pop("caller", None)  # its maker is gone, or let it go: the retry is nobody's
    if halt is not None:
        options["halt"] = halt
    queue.purge(run_id)  # messages of an earlier round, where the backend can drop them
    update_manifest(  # over a worker halting the run meanwhile: the retry starts it again
        store,
        run_id,
        lambda current: dataclasses.replace(
            current,
            state=RunState.ACTIVE.value,
            halted=None,
            cancelled_at=None,
            bundle=bundle,
            entry=entry,
            bundles=history,
            options=options,
        ),
    )
    for shard in todo:
        store.delete(Layout.failure(run_id, shard.id))
    publish_all(
        queue,
        (
            WorkMessage(run_id=run_id, shard=s.to_dict(), bundle=bundle, round=len(history) - 1)
            for s in todo
        ),
        None,
    )
    return [s.id for s in todo]


def record_halt(store: Store, run_id: str, rule: str) -> Manifest:
    """Record the halt rule a run is judged by from now on (the workers judge it too)."""

    def change(m: Manifest) -> Manifest | None:
        if m.options.get("halt") == rule:
            return None
        return dataclasses.replace(m, options={**m.options, "halt": rule})

    return update_manifest(store, run_id, change)


def wait_released(
    queue: WorkQueue,
    run_id: str,
    alive: Callable[[], set[str]],
    *,
    timeout: float,
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Wait until no live worker holds a message of the run (its attempts stopped), where the
    queue tells who holds what (this machine's; Pub/Sub does not say). ``alive``: the names of
    the workers still running. Returns how many are still held when ``timeout`` ran out.

    A cancelled run's attempts notice the cancel within a heartbeat; one still running when a
    retry with a new task starts would otherwise finish in the retried run with the old code.
    """
    deadline = clock.monotonic() + timeout
    while True:
        leases = queue.leases(run_id) or {}
        names = alive() if leases else set()
        held = sum(1 for worker in leases.values() if worker in names)
        if not held or clock.monotonic() >= deadline:
            return held
        clock.sleep(0.1)
