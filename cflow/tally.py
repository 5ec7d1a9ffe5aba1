"""A chunked run's progress counted in items: the engine counts its shards (chunks), and a
committed chunk may hold items that failed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cflow.chunks import span
from cflow.results import Progress
from runner.engine import runs
from runner.engine.cache import run_keys
from worker.protocol import Layout, Manifest, RunState, Shard, ShardResult
from worker.pyfunc import chunk_counts
from worker.store import Store


@dataclass
class ItemTally:
    """Item counts of a chunked run's settled chunks, each chunk's record read once.

    ``spans`` gives each chunk's first item and item count by id: from the items' feed in
    the process publishing them, else from the run's list (read again when more chunks are out
    than it listed: a stream's list grows as it is published)."""

    store: Store
    run_id: str
    spans: Callable[[], dict[str, tuple[int, int]]]
    _spans: dict[str, tuple[int, int]] = field(default_factory=dict)
    _counted: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (ok, failed)

    def refresh(self, published: int) -> None:
        """Read the run's list again if it may name chunks not yet known (``published``: how
        many are out); once per look, however many chunks are asked about."""
        if published > len(self._spans):
            self._spans = self.spans()

    def count(self, sid: str) -> int:
        """How many items chunk ``sid`` holds (0: not in the list read so far)."""
        return self._spans.get(sid, (0, 0))[1]

    def items(self, published: int) -> int:
        """Items in the first ``published`` chunks (while a stream is published its list
        lags the count: then those of the chunks listed so far)."""
        last = self._spans.get(f"{published - 1:07d}") if published > 0 else None
        if last is None:
            return max((first + count for first, count in self._spans.values()), default=0)
        return last[0] + last[1]

    def settle(self, settled: Iterable[str]) -> tuple[int, int]:
        """Items succeeded and failed in the chunks settled (committed or failed) so far."""
        new = sorted(set(settled) - self._counted.keys())
        records = self.store.get_many([Layout.result(self.run_id, sid) for sid in new])
        for sid in new:
            raw = records.get(Layout.result(self.run_id, sid))
            if raw is None:  # settled without a commit: the chunk failed, every item with it
                self._counted[sid] = (0, self.count(sid))
                continue
            count, bad = chunk_counts(ShardResult.from_json(raw).value) or (0, 0)
            self._counted[sid] = (count - bad, bad)
        return (
            sum(ok for ok, _ in self._counted.values()),
            sum(bad for _, bad in self._counted.values()),
        )

    def running(self, chunks: int, published: int) -> int:
        """Items in ``chunks`` running chunks, taken as the first unsettled ones (the queue
        hands chunks out about in order)."""
        items = 0
        for number in range(published):
            if chunks <= 0:
                break
            sid = f"{number:07d}"
            if sid not in self._counted:
                items += self.count(sid)
                chunks -= 1
        return items

    def cached(self) -> int:
        """Items of the chunks reused from earlier runs."""
        rows = run_keys(self.store, self.run_id)
        return sum(self.count(str(row["shard"])) for row in rows if row.get("from"))


def listed_spans(shards: Iterable[Shard]) -> dict[str, tuple[int, int]]:
    """Each chunk's first item and item count, by id."""
    return {s.id: found for s in shards if (found := span(s)) is not None}


def item_tally(
    store: Store, run_id: str, feed: Callable[[], dict[str, tuple[int, int]]] | None
) -> ItemTally | None:
    """The tally of a chunked run (None: one shard per item). ``feed``: the spans of the
    chunks the items' feed in this process made; without, the run's first shard says."""
    if feed is not None:
        return ItemTally(store, run_id, feed)
    first = next(iter(runs.iter_shards(store, run_id)), None)
    if first is None or span(first) is None:
        return None
    return ItemTally(store, run_id, lambda: listed_spans(runs.iter_shards(store, run_id)))


def progress(
    tally: ItemTally, manifest: Manifest, settled: set[str] | None, running: int
) -> Progress:
    """A chunked run's :class:`Progress` in items. ``settled``: the chunks committed or
    failed as a watcher here saw them (None: read from the store); ``running``: chunks being
    run."""
    published = manifest.shard_count - (1 if manifest.publishing else 0)
    if settled is None:
        settled = runs.committed(tally.store, tally.run_id) | runs.failed(tally.store, tally.run_id)
    tally.refresh(published)
    ok, bad = tally.settle(settled)
    return Progress(
        total=tally.items(published),
        succeeded=ok,
        failed=bad,
        running=tally.running(running, published),
        publishing=manifest.publishing,
        cancelled=manifest.state == RunState.CANCELLED.value,
        cached=tally.cached(),
        halted=manifest.halted,
    )
