"""Per-shard state as ``runner status`` shows it: every shard with its attempts, and lost ones.

The store is the truth: a shard is succeeded when its ``result.json`` exists, failed when its
``failed.json`` exists, cancelled when its run was cancelled before either, and otherwise running
or queued.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from runner.engine.runs import iter_shards, load_manifest
from worker.errors import NotFound
from worker.protocol import (
    AttemptStatus,
    Layout,
    Manifest,
    RunState,
    Shard,
    ShardFailure,
    ShardResult,
    ShardState,
)
from worker.store import Store

READ_THREADS = 32  # reads of a remote store's records in flight for `status`
READ_WINDOW = 512  # shard reports built ahead of the one being written


@dataclass
class ShardReport:
    """One shard as ``runner status`` shows it: its state, attempts, and result or failure."""

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

    @property
    def cached_from(self) -> str | None:
        """``<run>/<shard>`` when the shard was reused from an earlier run, not run."""
        return self.result.cached_from if self.result else None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "index": self.index,
            "input": self.input,
            "state": self.state.value,
            # The records hold only scalars: a shallow copy is asdict() at a tenth of the cost.
            "attempts": [dict(vars(a)) for a in self.attempts],
            "winning_attempt": self.result.attempt if self.result else None,
            "value": self.result.value if self.result else None,  # what run(shard) returned
            "duration": self.duration,
            "cached_from": self.cached_from,
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


def flag_lost(
    reports: Iterable[ShardReport],
    lookup: Callable[[], tuple[set[str], dict[str, str] | None]],
) -> Iterator[ShardReport]:
    """Show a running shard whose attempt's worker is gone (no instance of the fleet, no live
    lease) as ``lost``: the watcher puts it on the queue again. ``lookup`` gives the fleet's
    instance names and the run's lease holders; it is called once, at the first running shard.
    """
    found: tuple[set[str], dict[str, str] | None] | None = None
    for r in reports:
        if r.state is ShardState.RUNNING and r.attempts:
            if found is None:
                found = lookup()
            live, leases = found
            worker = r.attempts[-1].worker
            held = leases is not None and leases.get(r.id) == worker
            if worker not in live and not held:
                r = dataclasses.replace(r, state=ShardState.LOST)
        yield r
