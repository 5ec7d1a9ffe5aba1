"""Runs as the runner sees them: create, read back, cancel, retry, and per-shard state.

The store is the truth: a shard is succeeded when its ``result.json`` exists, failed when its
``failed.json`` exists, and otherwise queued or running.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

from worker import defaults
from worker.bundle import inspect_task, pack
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, NotFound, RunNotFound, RunStateError
from worker.protocol import (
    AttemptStatus,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    ShardFailure,
    ShardResult,
    ShardState,
    WorkMessage,
    is_valid_run_id,
    new_run_id,
)
from worker.queue import WorkQueue
from worker.store import Store

READ_THREADS = 32  # reads of a remote store's records in flight for `status`
READ_WINDOW = 512  # shard reports built ahead of the one being written

InputStager = Callable[[str, Shard], Shard]  # (run_id, shard) -> shard with a worker-readable input
Progress = Callable[[int], None]


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
) -> Manifest:
    """Bundle the task, write the manifest and shard list, and enqueue every shard.

    Shards stream through a temporary file, so a 100,000-shard run never sits in memory.
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
        )
        store.put(Layout.manifest(run_id), manifest.to_json())
        messages = (WorkMessage(run_id=run_id, shard=s.to_dict()) for s in _read_shards(listing))
        try:
            _publish(queue, messages, on_published)
        except BaseException as exc:
            # Half a run must not look like a run in progress: cancel what went out.
            save_manifest(store, manifest.with_state(RunState.CANCELLED))
            queue.purge(run_id)
            if isinstance(exc, Exception):
                raise BackendError(
                    f"publishing the shards of run {run_id} failed ({exc}); the run is cancelled,"
                    " submit again",
                    run_id=run_id,
                ) from exc
            raise
    return manifest


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
    if not is_valid_run_id(run_id):
        raise RunNotFound(f"{run_id!r} is not a run id; `runner runs` lists them", run_id=run_id)
    try:
        return Manifest.from_json(store.get(Layout.manifest(run_id)))
    except NotFound:
        raise RunNotFound(
            f"no run {run_id} in {store.url('')}; `runner runs` lists them", run_id=run_id
        ) from None


def save_manifest(store: Store, manifest: Manifest) -> None:
    store.put(Layout.manifest(manifest.run_id), manifest.to_json())


def iter_shards(store: Store, run_id: str) -> Iterator[Shard]:
    with tempfile.TemporaryDirectory(prefix="cflow-shards-") as tmp:
        path = Path(tmp) / "shards.jsonl"
        store.get_file(Layout.shard_list(run_id), path)
        yield from _read_shards(path)


def list_runs(store: Store) -> list[Manifest]:
    """Every run of the store, oldest first (an unreadable manifest is skipped)."""
    manifests = []
    for key in store.list("runs/", suffix="/run.json"):
        if key.count("/") != 2:
            continue
        try:
            manifests.append(Manifest.from_json(store.get(key)))
        except (NotFound, ValueError, TypeError):
            continue
    return sorted(manifests, key=lambda m: m.created_at)


def committed(store: Store, run_id: str) -> set[str]:
    """Ids of committed shards: one listing of the run, never a read per shard."""
    return _shards_with(store, run_id, "/result.json")


def failed(store: Store, run_id: str) -> set[str]:
    return _shards_with(store, run_id, "/failed.json")


def _shards_with(store: Store, run_id: str, suffix: str) -> set[str]:
    out = set()
    for key in store.list(Layout.shards_prefix(run_id), suffix=suffix):
        parts = Layout.parse_shard_key(key)
        if parts and parts[2] == suffix[1:]:
            out.add(parts[1])
    return out


@dataclass
class ShardReport:
    id: str
    index: int
    input: str | None
    state: ShardState
    attempts: list[AttemptStatus] = field(default_factory=list)
    result: ShardResult | None = None
    failure: ShardFailure | None = None

    @property
    def exit_code(self) -> int | None:
        if self.failure is not None:
            return self.failure.exit_code
        return self.attempts[-1].exit_code if self.attempts else None

    @property
    def duration(self) -> float | None:
        return self.result.duration if self.result else None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "index": self.index,
            "input": self.input,
            "state": self.state.value,
            # The records hold only scalars: a shallow copy is asdict() at a tenth of the cost.
            "attempts": [dict(vars(a)) for a in self.attempts],
            "winning_attempt": self.result.attempt if self.result else None,
            "duration": self.duration,
            "exit_code": self.exit_code,
            "reason": self.reason,
        }

    @property
    def reason(self) -> str | None:
        """Why the shard failed, or why its latest attempt ended (None when it succeeded)."""
        if self.failure is not None:
            return self.failure.reason
        if self.state is not ShardState.SUCCEEDED and self.attempts:
            return self.attempts[-1].reason
        return None


def shard_reports(store: Store, run_id: str) -> list[ShardReport]:
    """Every shard with its attempts (for `status`, not for watching)."""
    return list(iter_shard_reports(store, load_manifest(store, run_id)))


def iter_shard_reports(store: Store, manifest: Manifest) -> Iterator[ShardReport]:
    """Every shard with its attempts, in shard order: one listing of the run, then the records.

    A shard is succeeded with a ``result.json``, failed with a ``failed.json``, cancelled when
    the run was cancelled before either, else running (its latest attempt is) or queued. Records
    are read shard by shard as the reports are yielded; the winner's own claim is not read (its
    ``result.json`` says more).
    """
    run_id = manifest.run_id
    statuses: dict[str, list[int]] = {}
    results: set[str] = set()
    failures: set[str] = set()
    for key in store.list(Layout.shards_prefix(run_id), suffix=".json"):
        parts = Layout.parse_shard_key(key)
        if parts is None:
            continue
        _, shard_id, rest = parts
        if rest == "result.json":
            results.add(shard_id)
        elif rest == "failed.json":
            failures.add(shard_id)
        elif (
            rest.startswith("attempts/") and rest.endswith("/status.json") and rest.count("/") == 2
        ):
            digits = rest.split("/")[1]
            if digits.isdigit():
                statuses.setdefault(shard_id, []).append(int(digits))
    cancelled = manifest.state == RunState.CANCELLED.value

    def build(shard: Shard) -> ShardReport:
        won = None
        if shard.id in results:
            won = _read(store, Layout.result(run_id, shard.id), ShardResult)
        failure = (
            _read(store, Layout.failure(run_id, shard.id), ShardFailure)
            if won is None and shard.id in failures
            else None
        )
        tries = []
        for number in sorted(statuses.pop(shard.id, [])):
            if won is not None and number == won.attempt:
                tries.append(_winner(won))
            elif status := _read(store, Layout.status(run_id, shard.id, number), AttemptStatus):
                tries.append(status)
        if won is not None:
            state = ShardState.SUCCEEDED
        elif failure is not None:
            state = ShardState.FAILED
        elif cancelled:
            state = ShardState.CANCELLED
            tries = [_as_cancelled(a) for a in tries]
        elif tries and tries[-1].state == "running":
            state = ShardState.RUNNING
        else:
            state = ShardState.QUEUED
        return ShardReport(
            id=shard.id,
            index=shard.index,
            input=shard.input,
            state=state,
            attempts=tries,
            result=won,
            failure=failure,
        )

    shards = iter_shards(store, run_id)
    if store.local_path(Layout.manifest(run_id)) is not None:
        yield from map(build, shards)
        return
    # A bucket answers each read in tens of milliseconds: keep a window of them in flight.
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="status") as pool:
        window: deque[Future[ShardReport]] = deque()
        for shard in shards:
            window.append(pool.submit(build, shard))
            if len(window) >= READ_WINDOW:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


_R = TypeVar("_R", AttemptStatus, ShardResult, ShardFailure)


def _read(store: Store, key: str, record: type[_R]) -> _R | None:
    """A record, or None when it vanished or does not parse (a half-written or foreign file)."""
    try:
        return record.from_json(store.get(key))
    except (NotFound, ValueError, TypeError):
        return None


def _winner(result: ShardResult) -> AttemptStatus:
    return AttemptStatus(
        run_id=result.run_id,
        shard_id=result.shard_id,
        attempt=result.attempt,
        state="succeeded",
        worker=result.worker,
        started_at=result.started_at,
        finished_at=result.finished_at,
        exit_code=0,
        bundle=result.bundle,
    )


def _as_cancelled(status: AttemptStatus) -> AttemptStatus:
    """A cancelled run's attempt still marked running was stopped (or is being stopped)."""
    if status.state != "running":
        return status
    return dataclasses.replace(status, state="cancelled", reason="run cancelled")


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
    clock: Clock = SYSTEM_CLOCK,
) -> list[str]:
    """Re-enqueue every shard of a finished or cancelled run that has not committed.

    Committed shards are left alone; each retried shard gets a fresh failure budget. With
    ``task_dir`` the folder is bundled anew and the retried shards run that bundle: it becomes
    the manifest's ``bundle`` and is added to its ``bundles`` history, and every message names it.
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
    bundle: str | None = None
    changes: dict[str, object] = {"state": RunState.ACTIVE.value, "halted": None}
    if task_dir is not None:
        info = inspect_task(task_dir)
        data, bundle = pack(task_dir)
        if not store.exists(Layout.bundle(bundle)):
            store.put(Layout.bundle(bundle), data)
        history = list(manifest.bundles) or [
            {"sha256": manifest.bundle, "at": manifest.created_at, "shards": manifest.shard_count}
        ]
        history.append({"sha256": bundle, "at": clock.time(), "shards": len(todo)})
        changes.update(bundle=bundle, entry=info.entry.value, bundles=history)
    save_manifest(store, dataclasses.replace(manifest, **changes))  # type: ignore[arg-type]
    for shard in todo:
        store.delete(Layout.failure(run_id, shard.id))
    _publish(
        queue,
        (WorkMessage(run_id=run_id, shard=s.to_dict(), bundle=bundle) for s in todo),
        None,
    )
    return [s.id for s in todo]


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
