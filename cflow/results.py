"""Reading a run's results back: each shard's value, or its failure, in input order."""

from __future__ import annotations

import base64
import functools
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

from cflow.chunks import (
    ValueFile,
    attempt_failures,
    committed_items,
    failed_items,
    last_failed_attempt,
    read_log,
    span,
)
from cflow.errors import ShardFailed, shard_failed, unloadable
from cflow.pickling import loads as load_value
from cflow.shipping import item_of
from runner.engine import runs
from worker.errors import RunStateError
from worker.protocol import Layout, Manifest, RunState, Shard, ShardFailure, ShardResult
from worker.pyfunc import VALUE_FILE
from worker.store import Store

LAZY_BYTES = 1024 * 1024  # values larger than this are read from the store when asked for
NOT_RUN = "NotRun"  # the type_name of an item a halted run never ran


@dataclass(frozen=True)
class Progress:
    """Plain counts of a run's shards, for a progress display.

    ``total`` counts the items published so far while ``publishing`` (the iterable is still
    being read); ``done`` is ``succeeded + failed``."""

    total: int
    succeeded: int
    failed: int
    running: int
    publishing: bool = False
    cancelled: bool = False  # stopped before it was done: cancelled, or halted (``halted``)
    cached: int = 0  # of the succeeded, reused from earlier runs (``cache=True``)
    halted: str | None = None  # why its halt rule stopped it, where it did

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @property
    def queued(self) -> int:
        return max(self.total - self.done - self.running, 0)


@dataclass(frozen=True)
class Stored:
    """A value kept in the store, read each time it is asked for; item ``index`` of the run
    ``run_id``, in its shard ``shard_id``."""

    store: Store
    key: str
    index: int = 0
    run_id: str = ""
    shard_id: str = ""

    def load(self) -> Any:
        """The value, or where it will not unpickle here its item's :class:`ShardFailed`
        (:func:`cflow.errors.unloadable`), as a value."""
        load = functools.partial(load_value, self.store.get(self.key))
        return _loaded(load, index=self.index, run_id=self.run_id, shard_id=self.shard_id)


def _loaded(load: Callable[[], Any], *, index: int, run_id: str, shard_id: str) -> Any:
    """What ``load`` unpickles (its bytes read already), or where that raises, item
    ``index``'s :class:`ShardFailed` saying its value cannot be loaded here: one value that
    will not unpickle in this process fails its item, not the reading of every other."""
    try:
        return load()
    except Exception as exc:
        return unloadable(exc, index=index, run_id=run_id, shard_id=shard_id)


def read_value(store: Store, run_id: str, shard_id: str, index: int = 0) -> Any:
    """The shard's value: unpickled now when small, a :class:`Stored` when over 1 MB (a
    :class:`ShardFailed` where it will not unpickle here)."""
    return _value(store, run_id, shard_id, store.get(Layout.result(run_id, shard_id)), index)


def _value(store: Store, run_id: str, shard_id: str, record: bytes, index: int) -> Any:
    result = ShardResult.from_json(record)
    kept = result.value
    if not pickles(store, run_id):  # a task's run(shard) returned JSON: that is its value
        return kept
    if not isinstance(kept, dict):
        return None
    if "pickle" in kept:
        data = base64.b64decode(kept["pickle"])
        load = functools.partial(load_value, data)
        return _loaded(load, index=index, run_id=run_id, shard_id=shard_id)
    key = Layout.outputs(run_id, shard_id, result.attempt) + str(kept.get("file", VALUE_FILE))
    stored = Stored(store, key, index, run_id, shard_id)
    return stored if int(kept.get("size", 0)) > LAZY_BYTES else stored.load()


def pickles(store: Store, run_id: str) -> bool:
    """Whether the run's values are pickles of a ``cflow`` function's values: a run
    ``runner submit`` made returns JSON, which is never unpickled (a task's dict holding a
    ``"pickle"`` would otherwise run code of the task's choosing here). A run made before its
    manifest said so is told by its records' shape. Read once a store and run."""
    known = _pickles.setdefault(store, {})
    if run_id not in known:
        try:
            options = runs.load_manifest(store, run_id).options
        except Exception:  # gone, or unreadable: as before the manifest said
            return True
        known[run_id] = bool(options.get("function", True))
    return known[run_id]


_pickles: weakref.WeakKeyDictionary[Store, dict[str, bool]] = weakref.WeakKeyDictionary()


def run_values(
    store: Store, manifest: Manifest, return_exceptions: bool, unit: Callable[[], str]
) -> Results:
    """A finished run's values in input order (:func:`collect`).

    Raises:
        ShardFailed: as :func:`collect`.
        RunStateError: the run was cancelled before every ``unit`` (its shards: "items" or
            "chunks of items") was done.
    """
    run_id = manifest.run_id
    done = runs.committed(store, run_id)
    failed = runs.failed(store, run_id) - done
    stopped = manifest.state == RunState.CANCELLED.value
    settled = len(done) + len(failed) >= manifest.shard_count
    if not stopped or (manifest.halted and settled):
        return collect(store, run_id, runs.iter_shards(store, run_id), done, return_exceptions)
    if not manifest.halted:  # cancelled by someone: the values are not what was asked for
        raise cancelled_error(run_id, len(done), manifest.shard_count, unit())
    # Halted (--halt: its first attempts all failed alike): the failures are the news, and
    # the items it never ran say why they have no value.
    shards = runs.iter_shards(store, run_id)
    values = collect(store, run_id, shards, done, True, not_run=(done | failed, _halted(manifest)))
    if return_exceptions:
        return values
    failures = [v for v in values._values if isinstance(v, ShardFailed)]
    first = next((v for v in failures if v.type_name != NOT_RUN), None)
    skipped = len(failures) - sum(v.type_name != NOT_RUN for v in failures)
    if first is None:  # no failed attempt left its record: the halt itself is what is known
        raise RunStateError(
            f"run {run_id} halted ({manifest.halted}) with {len(done)} of"
            f" {manifest.shard_count} {unit()} done; `runner retry {run_id} --failed` runs the"
            " rest",
            run_id=run_id,
        )
    first.add_note(
        f"run {run_id} halted ({manifest.halted}); {skipped} items were not run. Fix the"
        " function and map again (with cache=True the items done are reused), or, where the"
        f" cause was outside it, `runner retry {run_id} --failed` runs again what failed and"
        " what was not run"
    )
    raise first


def collect(
    store: Store,
    run_id: str,
    shards: Iterable[Shard],
    done: set[str],
    return_exceptions: bool,
    *,
    not_run: tuple[set[str], str] | None = None,
    read: Mapping[str, list[Any]] | None = None,
) -> Results:
    """Every shard's value (``done``: the committed ones) or failure, in input order; the
    commit records read together (one query per 500 on this machine's store). ``not_run``:
    the shards settled (committed or failed) and why the others never ran: each of their
    items a :class:`ShardFailed` of type :data:`NOT_RUN` saying so. ``read``: committed
    shards' values read already (:func:`committed_values`), by shard id.

    Raises:
        ShardFailed: the first failed shard's, unless ``return_exceptions``.
    """
    read = read or {}
    records = store.get_many([Layout.result(run_id, sid) for sid in sorted(done - read.keys())])
    values: list[Any] = []
    for shard in shards:
        record = records.get(Layout.result(run_id, shard.id))
        if not_run is not None and shard.id not in not_run[0]:
            got = _unsettled(store, run_id, shard, not_run[1])
        elif shard.id in read:
            got = read[shard.id]
        elif record is not None or span(shard) is not None:
            got = committed_values(store, run_id, shard, record)
        else:
            got = [read_failed(store, run_id, shard.id, shard.index)]
        failed = next((v for v in got if isinstance(v, ShardFailed)), None)
        if failed is not None and not return_exceptions:
            raise failed
        values.extend(got)
    return Results(values, return_exceptions)


def committed_values(store: Store, run_id: str, shard: Shard, record: bytes | None) -> list[Any]:
    """A shard's values in input order from its commit ``record`` (a chunk's items each a
    value or a :class:`ShardFailed`; a chunk without a record: its items' failures)."""
    if span(shard) is not None:
        return shard_values(store, run_id, shard, record)
    assert record is not None
    return [_value(store, run_id, shard.id, record, shard.index)]


def _unsettled(store: Store, run_id: str, shard: Shard, why: str) -> list[ShardFailed]:
    """The items of a shard a stopped run left unsettled: what its last failed attempt says
    (a retry it never got), else a :data:`NOT_RUN` failure saying ``why``."""
    last = last_failed_attempt(store, run_id, shard.id)
    if last is not None:
        return attempt_failures(store, run_id, shard, last.attempt, last.reason or "failed")
    first, count = span(shard) or (shard.index, 1)
    reason = f"{NOT_RUN}: {why}"
    return [
        shard_failed("", reason, index=first + j, run_id=run_id, shard_id=shard.id)
        for j in range(count)
    ]


def shard_values(store: Store, run_id: str, shard: Shard, record: bytes | None) -> list[Any]:
    """A chunk shard's items in order: each a value (a :class:`Stored` when over 1 MB) or a
    :class:`ShardFailed`; ``record``: its commit record (None: the chunk failed)."""
    if record is None:
        return list(failed_items(store, run_id, shard))
    found = span(shard)
    first = found[0] if found is not None else shard.index
    out = committed_items(store, run_id, shard, ShardResult.from_json(record))
    files: dict[str, memoryview] = {}  # a chunk's file of values is read once
    for j, kept in enumerate(out):
        if not isinstance(kept, ValueFile):
            continue
        if kept.at is None:
            stored = Stored(store, kept.key, first + j, run_id, shard.id)
            out[j] = stored if kept.size > LAZY_BYTES else stored.load()
            continue
        if kept.key not in files:
            files[kept.key] = memoryview(store.get(kept.key))
        load = functools.partial(load_value, files[kept.key][kept.at : kept.at + kept.size])
        out[j] = _loaded(load, index=first + j, run_id=run_id, shard_id=shard.id)
    return out


def read_failed(store: Store, run_id: str, shard_id: str, index: int) -> ShardFailed:
    """The shard's failure, with what its last attempt's log says."""
    failure = ShardFailure.from_json(store.get(Layout.failure(run_id, shard_id)))
    log = read_log(store, run_id, shard_id, failure.attempt).decode("utf-8", "replace")
    return shard_failed(log, failure.reason, index=index, run_id=run_id, shard_id=shard_id)


class Results(Sequence[Any]):
    """A run's return values in input order, as a read-only sequence.

    Values up to 1 MB are in memory; a larger one is read from the store each time its item is
    asked for (indexing or iterating), and not kept. With ``return_exceptions`` a failed item
    is its :class:`~cflow.ShardFailed`; without, reading one raises it.
    """

    def __init__(self, values: list[Any], return_exceptions: bool):
        self._values = values
        self._return_exceptions = return_exceptions

    def __len__(self) -> int:
        return len(self._values)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self._load(v) for v in self._values[index]]
        return self._load(self._values[index])

    def __iter__(self) -> Iterator[Any]:
        for value in self._values:
            yield self._load(value)

    def _load(self, value: Any) -> Any:
        if isinstance(value, Stored):
            value = value.load()
        if isinstance(value, ShardFailed) and not self._return_exceptions:
            raise value
        return value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Results({len(self)} values)"


def completed(store: Store, run_id: str, shard: Shard) -> list[tuple[Any, Any]]:
    """A settled shard's ``(item, value)`` pairs, values over 1 MB read now, a failed item's
    value its :class:`ShardFailed`.

    Raises:
        NotFound: the shard has neither a commit nor a failure record (a cancel stopped it).
    """
    key = Layout.result(run_id, shard.id)
    record = store.get(key) if store.exists(key) else None
    if span(shard) is not None:
        got = shard_values(store, run_id, shard, record)
    elif record is not None:
        got = [_value(store, run_id, shard.id, record, shard.index)]
    else:
        got = [read_failed(store, run_id, shard.id, shard.index)]
    return [
        (shard_item(store, run_id, shard, j), value.load() if isinstance(value, Stored) else value)
        for j, value in enumerate(got)
    ]


def left_unsettled(
    store: Store, manifest: Manifest, settled: set[str], return_exceptions: bool, unit: str
) -> Iterator[tuple[Any, Any]]:
    """The end of ``as_completed`` over a run stopped with shards left unsettled (none left:
    nothing): a halted run's items that were not run (or whose retry never came), each as a
    failure, as ``results`` gives them; a run cancelled by someone raises, as ``results``
    does.

    Raises:
        RunStateError: the run was cancelled before every ``unit`` was done.
        ShardFailed: a halted run's unsettled item (unless ``return_exceptions``).
    """
    run_id = manifest.run_id
    if manifest.state != RunState.CANCELLED.value:
        return
    if not manifest.halted:
        done = len(runs.committed(store, run_id))
        raise cancelled_error(run_id, done, manifest.shard_count, unit)
    left = [s for s in runs.iter_shards(store, run_id) if s.id not in settled]
    for shard in left:
        for j, failed in enumerate(_unsettled(store, run_id, shard, _halted(manifest))):
            if not return_exceptions:
                raise failed
            yield shard_item(store, run_id, shard, j), failed


def cancelled_error(run_id: str, done: int, count: int, unit: str) -> RunStateError:
    """A cancelled run's values are not what was asked for: one line saying so (a run fed by
    an iterable that a cancel cut short has all it read done, and no more)."""
    cut = " (the items after those were never read)" if done >= count else ""
    return RunStateError(
        f"run {run_id} was cancelled with {done} of {count} {unit} done{cut}; `runner retry"
        f" {run_id} --failed` runs the rest",
        run_id=run_id,
    )


def _halted(manifest: Manifest) -> str:
    """Why a halted run's items that never ran have no value."""
    return f"the run halted before it ran: {manifest.halted}"


def shard_item(store: Store, run_id: str, shard: Shard, j: int = 0) -> Any:
    """Item ``j`` of a shard: a function's item read back, else what a task's shard is about
    (:func:`task_item`)."""
    return item_of(shard, store, run_id, j) if pickles(store, run_id) else task_item(shard)


def task_item(shard: Shard) -> Any:
    """What a shard of a run ``runner submit`` made is about: its input, its params, or (a
    shard of ``--shards N``) its index."""
    if shard.input is not None:
        return shard.input
    return shard.params if shard.params is not None else shard.index
