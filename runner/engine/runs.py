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
from collections.abc import Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path

from worker import defaults
from worker.backends.local.store import LocalStore
from worker.bundle import TaskInfo, inspect_task, pack
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, CFlowError, NotFound, RunNotFound
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
from worker.tempdirs import temp_folder

InputStager = Callable[[str, Shard], Shard]  # (run_id, shard) -> shard with a worker-readable input
Progress = Callable[[int], None]
# (run_id, a batch about to be published) -> the ids of the batch already committed, not to be
# published (runner.engine.cache reuses earlier runs' commits)
Reuse = Callable[[str, list[Shard]], set[str]]

PUBLISH_PAUSE_ENV = "CFLOW_PUBLISH_PAUSE"  # test hook: seconds to pause after each batch
PUBLISH_BATCH_ENV = "CFLOW_PUBLISH_BATCH"  # test hook: shards per batch, for a quick boundary


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
    run_id: str | None = None,
    reuse: Reuse | None = None,
    packed: tuple[bytes, str] | None = None,
) -> Manifest:
    """Bundle the task, write the manifest and shard list, and enqueue every shard.

    Shards stream through a temporary file, so a 100,000-shard run never sits in memory.
    ``on_created`` is called once the run exists, before publishing starts (the CLI prints the
    run id there). Publishing records its progress in the manifest, so a runner killed or cut
    off half way leaves a run that :func:`publish_rest` (``runner watch``) finishes.

    ``packed``: the folder's bundle, packed already (``(data, sha)``).

    Raises:
        BackendError: publishing failed part way; the run stays active and resumable.
    """
    info, sha = store_bundle(store, task_dir, packed)
    run_id = run_id or new_run_id(clock.time())  # given: its workers started before it
    with temp_folder("submit") as tmp:
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
            store,
            queue,
            manifest,
            on_published,
            clock=clock,
            shards=_read_shards(listing),
            reuse=reuse,
        )


def publish_rest(
    store: Store,
    queue: WorkQueue,
    manifest: Manifest,
    progress: Progress | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    shards: Iterator[Shard] | None = None,
    reuse: Reuse | None = None,
) -> Manifest:
    """Publish the shards of a run not yet recorded as published, in batches, recording each.

    A batch that went out but was not recorded is published again on resume: a duplicate
    message is harmless (the first commit wins). ``reuse`` sees each batch first; the shards it
    committed are not published. Returns the manifest as it now stands.

    Raises:
        BackendError: a batch could not be published; what was recorded stays resumable.
    """
    if not manifest.publishing:
        return manifest
    run_id = manifest.run_id
    done = manifest.published or 0
    pause = float(os.environ.get(PUBLISH_PAUSE_ENV) or 0)
    size = int(os.environ.get(PUBLISH_BATCH_ENV) or defaults.PUBLISH_BATCH)
    source = shards if shards is not None else iter_shards(store, run_id)
    it = islice(source, done, None)
    try:
        while batch := list(islice(it, size)):
            reused = reuse(run_id, batch) if reuse is not None else set()
            if todo := [s for s in batch if s.id not in reused]:
                queue.publish([WorkMessage(run_id=run_id, shard=s.to_dict()) for s in todo])
            done += len(batch)
            # Over the manifest as it stands: a `runner cancel` meanwhile is not overwritten.
            manifest = update_manifest(store, run_id, _published(done, clock.time()))
            if progress is not None:
                progress(len(batch))
            if manifest.state != RunState.ACTIVE.value:
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


def _published(count: int, at: float) -> Callable[[Manifest], Manifest]:
    return lambda m: dataclasses.replace(m, published=count, published_at=at)


def mark_published(store: Store, manifest: Manifest, *, clock: Clock = SYSTEM_CLOCK) -> Manifest:
    """Record every shard as published (a retry re-enqueued the rest itself)."""
    if not manifest.publishing:
        return manifest
    return update_manifest(
        store,
        manifest.run_id,
        lambda m: dataclasses.replace(m, published=m.shard_count, published_at=clock.time()),
    )


def publish_all(
    queue: WorkQueue, messages: Iterable[WorkMessage], progress: Progress | None = None
) -> int:
    """Put messages on the queue a batch at a time; how many went."""
    total = 0
    it = iter(messages)
    while batch := list(islice(it, defaults.PUBLISH_BATCH)):
        total += queue.publish(batch)
        if progress is not None:
            progress(len(batch))
    return total


def store_bundle(
    store: Store, task_dir: Path, packed: tuple[bytes, str] | None = None
) -> tuple[TaskInfo, str]:
    """The task folder's entry and its bundle's sha, the bundle stored under it (once: the
    same folder is the same bundle). ``packed``: the folder packed already (``(data, sha)``).

    Raises:
        TaskError: the folder has no task.py with run(shard), nor task.sh.
    """
    info = inspect_task(task_dir)
    data, sha = packed if packed is not None else pack(task_dir)
    if not store.exists(Layout.bundle(sha)):
        store.put(Layout.bundle(sha), data)
    return info, sha


def _read_shards(path: Path) -> Iterator[Shard]:
    with path.open(encoding="utf-8") as fh:
        yield from _shards_in(fh)


def _shards_in(lines: Iterable[str]) -> Iterator[Shard]:
    for line in lines:
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


def update_manifest(
    store: Store, run_id: str, change: Callable[[Manifest], Manifest | None]
) -> Manifest:
    """Change the run's manifest as it stands (``change``: None leaves it), written only over
    what was read: a concurrent writer (a worker halting the run, a ``runner cancel``) makes the
    store read it again and ``change`` apply anew, so no update is lost. The manifest now."""
    seen: list[Manifest] = []

    def apply(raw: bytes) -> bytes | None:
        seen[:] = [parse_manifest(raw)]
        new = change(seen[0])
        if new is not None:
            seen[:] = [new]
        return None if new is None else new.to_json()

    try:
        store.update(Layout.manifest(run_id), apply)
    except NotFound:
        raise RunNotFound(f"no run {run_id} in {store.url('')}", run_id=run_id) from None
    return seen[0]


def iter_shards(store: Store, run_id: str) -> Iterator[Shard]:
    """The run's shards, from its shard list: read where the store keeps it on this machine
    (it is replaced whole, never written in place, so an open copy stays whole), else from a
    download."""
    key = Layout.shard_list(run_id)
    local = store.local_path(key)
    if local is not None:
        try:
            fh = local.open(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None
        with fh:
            yield from _shards_in(fh)
        return
    with temp_folder("shards") as tmp:
        path = Path(tmp) / "shards.jsonl"
        store.get_file(key, path)
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


@dataclasses.dataclass
class MarkerPages:
    """A run's commit and failure markers read a bounded page at a time, each kind continuing
    where its last page stopped and wrapping around at the end (the watcher's reconcile)."""

    store: Store
    run_id: str
    limit: int
    cursors: dict[str, str | None] = dataclasses.field(
        default_factory=lambda: {"/result.json": None, "/failed.json": None}
    )

    def all(self) -> tuple[set[str], set[str]]:
        """Every committed and every failed shard (one full listing); the pages start over."""
        self.cursors = dict.fromkeys(self.cursors)
        return committed(self.store, self.run_id), failed(self.store, self.run_id)

    def next(self) -> tuple[list[str], list[str]]:
        """The next page of committed and of failed shards."""
        return self._page("/result.json"), self._page("/failed.json")

    def _page(self, suffix: str) -> list[str]:
        ids, self.cursors[suffix] = marker_page(
            self.store, self.run_id, suffix, start_after=self.cursors[suffix], limit=self.limit
        )
        return ids


def cancel(
    store: Store,
    queue: WorkQueue,
    run_id: str,
    *,
    halted: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> int:
    """Mark the run cancelled (workers drop its messages and stop its tasks); purge its queue.

    ``halted`` records why the runner stopped the run itself (the ``--halt`` rule). A run that
    is over already (finished, cancelled, halted) is left as it is: a finished run would
    otherwise read as cancelled, and a halted one lose why it halted.
    """

    def cancelled(m: Manifest) -> Manifest:
        if m.state != RunState.ACTIVE.value:
            return m
        return dataclasses.replace(
            m, state=RunState.CANCELLED.value, halted=halted, cancelled_at=clock.time()
        )

    update_manifest(store, run_id, cancelled)
    return queue.purge(run_id)


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
