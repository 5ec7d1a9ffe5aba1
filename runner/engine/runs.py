"""Runs as the runner sees them: create and publish, read back, cancel, retry.

The store is the truth: a run is its manifest (``run.json``) and shard list, and a shard is
succeeded when its ``result.json`` exists, failed when its ``failed.json`` exists, and otherwise
queued or running. Every shard with its attempts is :mod:`runner.engine.reports`; every run of a
store, :mod:`runner.engine.listing`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

from worker import defaults
from worker.backends.local.store import LocalStore
from worker.bundle import inspect_task, pack
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, CFlowError, NotFound, RunNotFound, RunStateError
from worker.protocol import (
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    ShardFailure,
    WorkMessage,
    is_valid_run_id,
    new_run_id,
)
from worker.queue import WorkQueue
from worker.store import Store

InputStager = Callable[[str, Shard], Shard]  # (run_id, shard) -> shard with a worker-readable input
Progress = Callable[[int], None]

PUBLISH_PAUSE_ENV = "CFLOW_PUBLISH_PAUSE"  # test hook: seconds to pause after each batch


def create_run(
    *,
    store: Store,
    queue: WorkQueue,
    task_dir: Path,
    shards: Iterable[Shard],
    options: RunOptions,
    clock: Clock = SYSTEM_CLOCK,
    stage_input: InputStager | None = None,
    on_published: Progress | None = None,
    on_created: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Bundle the task, write the manifest and shard list, and enqueue every shard.

    Shards stream through a temporary file, so a 100,000-shard run never sits in memory.
    ``on_created`` is called once the run exists, before publishing starts (the CLI prints the
    run id there). Publishing records its progress in the manifest, so a runner killed or cut
    off half way leaves a run that :func:`publish_rest` (``runner watch``) finishes.

    Raises:
        BackendError: publishing failed part way; the run stays active and resumable.
    """
    info = inspect_task(task_dir)
    data, sha = pack(task_dir)
    if not store.exists(Layout.bundle(sha)):
        store.put(Layout.bundle(sha), data)
    run_id = new_run_id(clock.time())
    with tempfile.TemporaryDirectory(prefix="cflow-submit-") as tmp:
        listing = Path(tmp) / "shards.jsonl"
        count = 0
        with listing.open("w", encoding="utf-8") as fh:
            for shard in shards:
                if stage_input is not None and shard.input:
                    shard = stage_input(run_id, shard)
                fh.write(json.dumps(shard.to_dict(), sort_keys=True) + "\n")
                count += 1
        store.put_file(Layout.shard_list(run_id), listing)
        manifest = Manifest(
            run_id=run_id,
            bundle=sha,
            entry=info.entry.value,
            shard_count=count,
            options=options.to_dict(),
            created_at=clock.time(),
            task_name=task_dir.resolve().name,
            published=0,
            published_at=clock.time(),
        )
        store.put(Layout.manifest(run_id), manifest.to_json())
        if on_created is not None:
            on_created(manifest)
        return publish_rest(
            store, queue, manifest, on_published, clock=clock, shards=_read_shards(listing)
        )


def publish_rest(
    store: Store,
    queue: WorkQueue,
    manifest: Manifest,
    progress: Progress | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    shards: Iterator[Shard] | None = None,
) -> Manifest:
    """Publish the shards of a run not yet recorded as published, in batches, recording each.

    A batch that went out but was not recorded is published again on resume: a duplicate
    message is harmless (the first commit wins). Returns the manifest as it now stands.

    Raises:
        BackendError: a batch could not be published; what was recorded stays resumable.
    """
    if not manifest.publishing:
        return manifest
    run_id = manifest.run_id
    done = manifest.published or 0
    pause = float(os.environ.get(PUBLISH_PAUSE_ENV) or 0)
    source = shards if shards is not None else iter_shards(store, run_id)
    it = islice(source, done, None)
    try:
        while batch := list(islice(it, defaults.PUBLISH_BATCH)):
            queue.publish([WorkMessage(run_id=run_id, shard=s.to_dict()) for s in batch])
            done += len(batch)
            # Re-read before writing: a `runner cancel` meanwhile must not be overwritten.
            current = load_manifest(store, run_id)
            manifest = dataclasses.replace(current, published=done, published_at=clock.time())
            save_manifest(store, manifest)
            if progress is not None:
                progress(len(batch))
            if current.state != RunState.ACTIVE.value:
                return manifest
            if pause:
                clock.sleep(pause)
    except CFlowError as exc:
        raise BackendError(
            f"publishing run {run_id} stopped after {done} of {manifest.shard_count} shards"
            f" ({exc}); `runner watch {run_id}` publishes the rest",
            run_id=run_id,
        ) from exc
    except Exception as exc:
        raise BackendError(
            f"publishing run {run_id} stopped after {done} of {manifest.shard_count} shards"
            f" ({type(exc).__name__}: {exc}); `runner watch {run_id}` publishes the rest",
            run_id=run_id,
        ) from exc
    return manifest


def mark_published(store: Store, manifest: Manifest, *, clock: Clock = SYSTEM_CLOCK) -> Manifest:
    """Record every shard as published (a retry re-enqueued the rest itself)."""
    if not manifest.publishing:
        return manifest
    done = dataclasses.replace(manifest, published=manifest.shard_count, published_at=clock.time())
    save_manifest(store, done)
    return done


def _publish(queue: WorkQueue, messages: Iterable[WorkMessage], progress: Progress | None) -> int:
    total = 0
    it = iter(messages)
    while batch := list(islice(it, defaults.PUBLISH_BATCH)):
        total += queue.publish(batch)
        if progress is not None:
            progress(len(batch))
    return total


def _read_shards(path: Path) -> Iterator[Shard]:
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield Shard.from_json(line)


def load_manifest(store: Store, run_id: str) -> Manifest:
    """Read a run's manifest.

    Raises:
        RunNotFound: no such run.
        BackendError: its ``run.json`` is there but unreadable (names the file).
    """
    if not is_valid_run_id(run_id):
        raise RunNotFound(f"{run_id!r} is not a run id; `runner runs` lists them", run_id=run_id)
    key = Layout.manifest(run_id)
    try:
        raw = store.get(key)
    except NotFound:
        raise RunNotFound(
            f"no run {run_id} in {store.url('')}; `runner runs` lists them", run_id=run_id
        ) from None
    try:
        return parse_manifest(raw)
    except ValueError as exc:
        raise BackendError(
            f"{store.url(key)} is broken ({exc}); restore it, or remove the run's folder",
            run_id=run_id,
        ) from None


def parse_manifest(raw: bytes) -> Manifest:
    """A manifest from its JSON; ValueError (saying what is wrong) for a broken one."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        manifest = Manifest.from_dict(data)
    except TypeError as exc:
        raise ValueError(f"fields missing: {exc}") from None
    if not isinstance(manifest.shard_count, int) or not isinstance(manifest.run_id, str):
        raise ValueError("run_id or shard_count of the wrong type")
    return manifest


def save_manifest(store: Store, manifest: Manifest) -> None:
    store.put(Layout.manifest(manifest.run_id), manifest.to_json())


def iter_shards(store: Store, run_id: str) -> Iterator[Shard]:
    with tempfile.TemporaryDirectory(prefix="cflow-shards-") as tmp:
        path = Path(tmp) / "shards.jsonl"
        store.get_file(Layout.shard_list(run_id), path)
        yield from _read_shards(path)


def committed(store: Store, run_id: str) -> set[str]:
    """Ids of committed shards: one listing of the run, never a read per shard."""
    return _shards_with(store, run_id, "/result.json")


def failed(store: Store, run_id: str) -> set[str]:
    return _shards_with(store, run_id, "/failed.json")


def _shards_with(store: Store, run_id: str, suffix: str) -> set[str]:
    return set(marker_page(store, run_id, suffix)[0])


def marker_page(
    store: Store,
    run_id: str,
    suffix: str,
    *,
    start_after: str | None = None,
    limit: int | None = None,
) -> tuple[list[str], str | None]:
    """Shard ids with a ``result.json`` or ``failed.json`` marker (``suffix``), in key order.

    One bounded page with ``limit``; returns the ids and the key to continue after (None at the
    end). The local store lists its marker rows without walking the run's logs and outputs.
    """
    prefix = Layout.shards_prefix(run_id)
    if isinstance(store, LocalStore):
        # A page is ``limit`` records of any kind, filtered here: a bounded range scan even
        # when no record has this suffix (a run with no failures).
        keys = store.list_records(prefix, start_after=start_after, limit=limit)
    else:  # Cloud Storage filters by suffix itself (matchGlob): a page is ``limit`` markers
        keys = store.list(prefix, suffix=suffix, start_after=start_after, limit=limit)
    ids, last, seen = [], None, 0
    for key in keys:
        seen += 1
        last = key
        parts = Layout.parse_shard_key(key)
        if parts and parts[2] == suffix[1:]:
            ids.append(parts[1])
    return ids, (last if limit is not None and seen >= limit else None)


def cancel(store: Store, queue: WorkQueue, run_id: str, *, halted: str | None = None) -> int:
    """Mark the run cancelled (workers drop its messages and stop its tasks); purge its queue.

    ``halted`` records why the runner stopped the run itself (the ``--halt`` rule).
    """
    manifest = load_manifest(store, run_id)
    save_manifest(
        store, dataclasses.replace(manifest, state=RunState.CANCELLED.value, halted=halted)
    )
    return queue.purge(run_id)


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
    if halt is not None:
        options["halt"] = halt
    queue.purge(run_id)  # messages of an earlier round, where the backend can drop them
    save_manifest(
        store,
        dataclasses.replace(
            manifest,
            state=RunState.ACTIVE.value,
            halted=None,
            bundle=bundle,
            entry=entry,
            bundles=history,
            options=options,
        ),
    )
    for shard in todo:
        store.delete(Layout.failure(run_id, shard.id))
    _publish(
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
    manifest = load_manifest(store, run_id)
    if manifest.options.get("halt") != rule:
        manifest = dataclasses.replace(manifest, options={**manifest.options, "halt": rule})
        save_manifest(store, manifest)
    return manifest


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


def mark_dead_lettered(store: Store, message: WorkMessage) -> bool:
    """Record a dead-lettered shard as failed unless it committed; True if newly failed."""
    run_id, shard_id = message.run_id, message.shard_id
    if not is_valid_run_id(run_id) or not store.exists(Layout.manifest(run_id)):
        return False  # not a run of this store: nothing to record
    if store.exists(Layout.result(run_id, shard_id)) or store.exists(
        Layout.failure(run_id, shard_id)
    ):
        return False
    failure = ShardFailure(
        run_id=run_id,
        shard_id=shard_id,
        attempt=None,
        failures=message.failures,
        exit_code=None,
        reason="dead-lettered: the shard's message kept crashing or losing its worker",
    )
    store.put(Layout.failure(run_id, shard_id), failure.to_json())
    return True
