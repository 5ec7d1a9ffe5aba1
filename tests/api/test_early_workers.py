"""A local map starts its workers while the run is made: as many as the run will use where the
items' count is known, one where a generator's is not (the rest then start at the first poll)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow.chunks import Chunking
from cflow.shipping import ItemFeed, make_task, task_dir
from runner import config as config_mod
from runner.engine.watch import Snapshot, Watcher
from runner.finish import Ending
from runner.submit import SubmitRequest, submit


def _double(x: int) -> int:
    return 2 * x


def _generated(n: int) -> Iterator[int]:
    yield from range(n)


def _workers_before_first_poll(
    tmp_path: Path, items: Iterable[Any], chunk_size: int | None = None
) -> int:
    """How many workers exist when the watch of a 2-worker map over ``items`` begins."""
    config = config_mod.resolve(local=True, store_dir=tmp_path / "store")
    folder = make_task(_double)
    seen: list[int] = []

    def display(watcher: Watcher, poll_seconds: float) -> Snapshot:
        assert watcher.fleet is not None
        seen.append(len(watcher.fleet.instances()))
        return watcher.watch(poll_seconds=poll_seconds)

    try:
        feed = ItemFeed(items, Chunking.pick(items, chunk_size, slots=2, tries=1))
        request = SubmitRequest(task_dir(folder), feed=feed, workers=2, check=False, local=True)
        done = submit(request, config, display=display)
    finally:
        folder.cleanup()
    assert done.outcome is not None and done.outcome.ending is Ending.SETTLED
    return seen[0]


def test_a_sized_map_starts_every_worker_before_the_watch(tmp_path: Path) -> None:
    assert _workers_before_first_poll(tmp_path, list(range(40))) == 2


def test_a_sized_map_of_single_items_starts_every_worker(tmp_path: Path) -> None:
    assert _workers_before_first_poll(tmp_path, [1, 2, 3], chunk_size=1) == 2


@pytest.mark.parametrize("kind", ["generator", "one chunk"])
def test_a_map_of_unknown_length_or_one_chunk_starts_one(tmp_path: Path, kind: str) -> None:
    # A generator's length is known only at its end; a single chunk needs a single worker.
    if kind == "generator":
        assert _workers_before_first_poll(tmp_path, _generated(40)) == 1
    else:
        assert _workers_before_first_poll(tmp_path, list(range(40)), chunk_size=50) == 1
