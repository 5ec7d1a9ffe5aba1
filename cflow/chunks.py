"""Chunks: many small items in fewer shards, so a map of thousands of calls pays the engine's
per-shard path (a claim, a commit, an ack, a record) once per chunk instead of once per item.

A chunk is one shard holding consecutive items (``worker.pyfunc`` runs them one after another
and commits every item's outcome in one record). How many items go in one: ``chunk_size=`` when
given (1: one shard per item, the plain form); else enough chunks that every worker slot gets
:data:`CHUNKS_PER_SLOT` of them, at most :data:`MAX_CHUNK` items (more where a known count
would make over :data:`MAX_CHUNKS` chunks), from the item count where the iterable has a length,
and from the count read so far where it has none (a generator's first chunks are single items,
and they grow as it goes on). A chunk also closes once its items' pickles reach
:data:`CHUNK_BYTES`, so one never grows large.

What the caller reads back is per item, whatever the chunking: a value, or a
:class:`~cflow.ShardFailed` with the item's own index, exception, traceback and its part of the
chunk's log.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import pickle
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

from cflow.errors import ShardFailed, shard_failed, unloadable
from cflow.pickling import BY_VALUE
from cflow.pickling import loads as load_value
from worker.errors import ConfigError, NotFound
from worker.ledger import CANCELLED
from worker.protocol import AttemptStatus, Layout, Shard, ShardFailure, ShardResult
from worker.pyfunc import CHUNK_PARAM, CHUNK_PICKLES, ENTRIES_FILE, ERROR_MARK, ITEMS_PARAM
from worker.store import Store

CHUNKS_PER_SLOT = 4  # chunks each worker slot gets, when the size is chosen
# Items in a chosen chunk at most: a rerun or a cache miss stays small. A chunk's bookkeeping
# (a claim, a durable commit, a trip to the task host) costs about what 250 calls of a no-op
# do, so a full chunk of quick calls spends no longer being a shard than running its calls;
# it is also multiprocessing.Pool.map's chunk for 2,000 items on 2 processes.
MAX_CHUNK = 250
# Chunks of a map whose item count is known, at most: each costs about a millisecond to claim,
# commit and read back (or to reuse from the cache), so a million quick calls in chunks of 250
# spent 4 s on that alone. Past 250,000 items a chunk holds more than MAX_CHUNK.
MAX_CHUNKS = 1000
CHUNK_BYTES = 1024 * 1024  # a chunk closes once its items' pickles hold this many bytes
CHUNK_INLINE_LIMIT = 64 * 1024  # bytes of a chunk's items carried in its params; more: the store


@dataclass(frozen=True)
class Chunking:
    """How many items go in each shard of a run.

    Attributes:
        fixed: ``chunk_size=``, or None: chosen from ``total`` and ``slots``.
        total: how many items, where the iterable says (None: a generator's, unknown).
        slots: workers times their slots.
        tries: tries an item that raises gets in its chunk (the run's retries plus one).
        timeout: seconds one item may run (None: only its chunk's attempt is timed).
    """

    fixed: int | None
    total: int | None
    slots: int
    tries: int
    timeout: float | None = None

    @classmethod
    def pick(
        cls,
        items: Iterable[Any],
        chunk_size: int | None,
        slots: int,
        tries: int,
        timeout: float | None = None,
    ) -> Chunking:
        """The chunking of a run over ``items``.

        Raises:
            ConfigError: ``chunk_size`` is not a whole number of at least 1.
        """
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ConfigError(
                f"chunk_size={chunk_size!r}: give a whole number of items per shard, at least 1"
                " (1: one shard per item), or leave it out to have it chosen"
            )
        total = len(items) if isinstance(items, Sized) else None
        return cls(chunk_size, total, max(slots, 1), max(tries, 1), timeout)

    @property
    def chunked(self) -> bool:
        """Whether items go in chunks at all (else one shard per item, the plain form)."""
        if self.fixed is not None:
            return self.fixed > 1
        return self.total is None or self.size(0) > 1

    @property
    def largest(self) -> int:
        """The most items one chunk may hold (an attempt's timeout is this many items')."""
        return self.fixed or (self.size(0) if self.total is not None else MAX_CHUNK)

    def at_least(self) -> int | None:
        """How many chunks the items make at least, where their count is known (a chunk that
        reaches :data:`CHUNK_BYTES` closes early: there may be more, never fewer)."""
        if self.total is None:
            return None
        return math.ceil(self.total / self.size(0)) if self.total else 0

    def size(self, seen: int) -> int:
        """Items in the next chunk, ``seen`` items having been read."""
        if self.fixed is not None:
            return self.fixed
        count = self.total if self.total is not None else seen
        size = max(1, min(MAX_CHUNK, math.ceil(count / (self.slots * CHUNKS_PER_SLOT))))
        if self.total is not None:  # past MAX_CHUNKS chunks, they grow (a known count only)
            size = max(size, math.ceil(self.total / MAX_CHUNKS))
        return size

    def shards(
        self,
        pickled: Iterator[tuple[int, bytes]],
        store: Store,
        run_id: str,
        classes: Callable[[], dict[str, Any]] = dict,
    ) -> Iterator[Shard]:
        """Chunk shards of the items' pickles (``(index, pickle)`` in input order); the
        shard's index is the chunk's, its id the zero-padded index. ``classes``: what the
        items pickled since it was last called name by value (``cflow.pickling``), asked as
        each chunk closes."""
        chunk: list[bytes] = []
        first, held, number, size = 0, 0, 0, 0
        try:
            for index, data in pickled:
                if not chunk:
                    first, size = index, self.size(index)  # once a chunk, not once an item
                chunk.append(data)
                held += len(data)
                if len(chunk) >= size or held >= CHUNK_BYTES:
                    yield self._shard(number, first, chunk, store, run_id, classes())
                    chunk, held, number = [], 0, number + 1
        except Exception:
            if chunk:  # the items read before what the iterable raised still run
                yield self._shard(number, first, chunk, store, run_id, classes())
            raise
        if chunk:
            yield self._shard(number, first, chunk, store, run_id, classes())

    def _shard(
        self,
        number: int,
        first: int,
        chunk: list[bytes],
        store: Store,
        run_id: str,
        classes: dict[str, Any],
    ) -> Shard:
        sid = f"{number:07d}"
        data = pickle.dumps(chunk, protocol=pickle.HIGHEST_PROTOCOL)
        spec: dict[str, Any] = {"first": first, "count": len(chunk), "tries": self.tries}
        if self.timeout is not None:
            spec["timeout"] = self.timeout
        params: dict[str, Any] = {CHUNK_PARAM: spec, **classes}
        if len(data) <= CHUNK_INLINE_LIMIT:
            params[ITEMS_PARAM] = base64.b64encode(data).decode("ascii")
            return Shard(id=sid, index=number, params=params)
        key = f"{Layout.uploads(run_id)}{sid}.pkl"
        store.put(key, data)
        local = store.local_path(key)
        where = str(local) if local else store.url(key)
        return Shard(id=sid, index=number, input=where, params=params)


def span(shard: Shard) -> tuple[int, int] | None:
    """A chunk shard's first item index and item count (None: a shard of one plain item)."""
    spec = (shard.params or {}).get(CHUNK_PARAM)
    if not isinstance(spec, dict):
        return None
    return int(spec["first"]), int(spec["count"])


def chunk_item(shard: Shard, j: int, store: Store, run_id: str) -> Any:
    """Item ``j`` of a chunk shard, read back."""
    if shard.params and ITEMS_PARAM in shard.params:
        data = base64.b64decode(shard.params[ITEMS_PARAM])
    else:
        data = store.get(f"{Layout.uploads(run_id)}{shard.id}.pkl")
    return load_value(pickle.loads(data)[j])


def _marks(log: bytes) -> dict[int, tuple[dict[str, Any], int]]:
    """The error records of a chunk's log by item index, each with where its line ends."""
    found: dict[int, tuple[dict[str, Any], int]] = {}
    mark = ERROR_MARK.encode()
    at = 0
    for line in log.splitlines(keepends=True):
        at += len(line)
        if line.startswith(mark):
            try:
                record = json.loads(line[len(mark) :])
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("item"), int):
                found[record["item"]] = (record, at)
    return found


def read_log(store: Store, run_id: str, shard_id: str, attempt: int | None) -> bytes:
    if attempt is None:
        return b""
    try:
        return store.get(Layout.log(run_id, shard_id, attempt))
    except NotFound:
        return b""


def _failed(
    log: bytes, marks: dict[int, tuple[dict[str, Any], int]], index: int, reason: str, **ids: Any
) -> ShardFailed:
    """Item ``index``'s failure: its own error record and its part of the log where it has
    one, else the chunk's ``reason`` and the log's tail."""
    found = marks.get(index)
    if found is None:  # the other items' error lines are theirs, not this item's
        mark = ERROR_MARK.encode()
        text = b"".join(
            line for line in log.splitlines(keepends=True) if not line.startswith(mark)
        ).decode("utf-8", "replace")
    else:
        record, end = found
        start = int(record.get("log_from") or 0)
        text = log[start if 0 <= start <= end else 0 : end].decode("utf-8", "replace")
    return shard_failed(text, reason, index=index, **ids)


@dataclass(frozen=True)
class ValueFile:
    """An item's value kept in an output file of its chunk's attempt (no room in the chunk's
    record): the store key, its size, and where it starts in the chunk's one file of such
    values (None: the value is the whole file)."""

    key: str
    size: int
    at: int | None = None


def chunk_entries(store: Store, run_id: str, shard_id: str, result: ShardResult) -> list[Any]:
    """A committed chunk's entries, one an item: from its record, or the file its record
    names when they were too many for it (``worker.pyfunc.shared.ENTRIES_FILE``)."""
    kept = result.value.get("chunk", {}) if isinstance(result.value, dict) else {}
    if not isinstance(kept, dict):
        return []
    if kept.get("entries") == ENTRIES_FILE:
        key = Layout.outputs(run_id, shard_id, result.attempt) + ENTRIES_FILE
        entries = json.loads(store.get(key))
        return entries if isinstance(entries, list) else []
    return kept.get("values") or []


def committed_items(store: Store, run_id: str, shard: Shard, result: ShardResult) -> list[Any]:
    """A committed chunk's items in order: each one's value (unpickled from the record, or a
    :class:`ValueFile`) or its :class:`ShardFailed`."""
    kept = result.value.get("chunk", {}) if isinstance(result.value, dict) else {}
    first = int(kept.get("first", 0))

    def value(j: int, raw: bytes) -> Any:
        """Item ``j``'s value; where it will not unpickle here, its own ShardFailed (one
        such value took every other down with it). Per item, thousands in a map: the
        standard unpickler where no class came by value."""
        try:
            return pickle.loads(raw) if BY_VALUE not in raw else load_value(raw)
        except Exception as exc:
            return unloadable(exc, index=first + j, run_id=run_id, shard_id=shard.id)

    if isinstance(kept, dict) and CHUNK_PICKLES in kept:  # every item's value, in one list
        raws = pickle.loads(binascii.a2b_base64(kept[CHUNK_PICKLES]))
        try:  # all at once, with no call per item; one by one where one will not load
            return [pickle.loads(r) if BY_VALUE not in r else load_value(r) for r in raws]
        except Exception:
            return [value(j, raw) for j, raw in enumerate(raws)]
    entries = chunk_entries(store, run_id, shard.id, result)
    out: list[Any] = []
    log: bytes | None = None
    marks: dict[int, tuple[dict[str, Any], int]] = {}
    decode = binascii.a2b_base64
    for j, entry in enumerate(entries):
        data = entry.get("pickle")
        if data is not None:
            out.append(value(j, decode(data)))
        elif "file" in entry:
            key = Layout.outputs(run_id, shard.id, result.attempt) + str(entry["file"])
            at = entry.get("at")
            out.append(ValueFile(key, int(entry.get("size", 0)), None if at is None else int(at)))
        else:
            if log is None:
                log = read_log(store, run_id, shard.id, result.attempt)
                marks = _marks(log)
            reason = f"ItemFailed: item {first + j} failed its {entry.get('failed')} tries"
            out.append(_failed(log, marks, first + j, reason, run_id=run_id, shard_id=shard.id))
    return out


def failed_items(store: Store, run_id: str, shard: Shard) -> list[ShardFailed]:
    """A failed chunk's items, each a :class:`ShardFailed`: the item's own error where it
    raised what ended the chunk's attempt, else the chunk's reason (a timeout, a crash)."""
    failure = ShardFailure.from_json(store.get(Layout.failure(run_id, shard.id)))
    return attempt_failures(store, run_id, shard, failure.attempt, failure.reason)


def attempt_failures(
    store: Store, run_id: str, shard: Shard, attempt: int | None, why: str
) -> list[ShardFailed]:
    """The items of a shard whose attempt ``attempt`` failed for ``why``, each a
    :class:`ShardFailed`: its own error where its part of the log has one, else ``why`` (with,
    for a chunk, the note that its items ran as one)."""
    log = read_log(store, run_id, shard.id, attempt)
    found = span(shard)
    if found is None:  # one item: the whole log is its own
        text = log.decode("utf-8", "replace")
        return [shard_failed(text, why, index=shard.index, run_id=run_id, shard_id=shard.id)]
    first, count = found
    marks = _marks(log)
    name, _, text = why.partition(": ")
    if not text:
        name, text = "ShardError", why
    reason = f"{name}: {text} (items {first} to {first + count - 1} ran as one chunk)"
    return [
        _failed(log, marks, first + j, reason, run_id=run_id, shard_id=shard.id)
        for j in range(count)
    ]


def last_failed_attempt(store: Store, run_id: str, shard_id: str) -> AttemptStatus | None:
    """The latest attempt of a shard that ended failed by itself (None: none did); one the
    run's cancel or halt stopped says nothing of its items (they were not run to their end)."""
    prefix = f"{Layout.shard_prefix(run_id, shard_id)}attempts/"
    found: list[AttemptStatus] = []
    for key in store.list(prefix, suffix="/status.json"):
        with contextlib.suppress(NotFound, ValueError):
            status = AttemptStatus.from_json(store.get(key))
            if status.state == "failed" and status.reason != CANCELLED:
                found.append(status)
    return max(found, key=lambda s: s.attempt, default=None)
