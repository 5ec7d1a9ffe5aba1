"""Many small items in chunk shards: values in input order, a failing item among good ones,
``as_completed`` per item, the cache per chunk, and the run as the CLI sees it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

import cflow
from cflow.chunks import MAX_CHUNK, MAX_CHUNKS, Chunking
from cflow.shipping import ItemFeed
from runner.engine import runs
from tests.api.helpers import Rejected, check, crashes, hangs
from tests.e2e.conftest import Cli
from worker.bundle import pack
from worker.errors import ConfigError
from worker.protocol import Layout, ShardResult
from worker.pyfunc import CHUNK_PICKLES

pytestmark = pytest.mark.e2e


def _chunks(run: cflow.Run) -> list[Any]:
    return list(runs.iter_shards(run._store, run.id))


def test_values_come_back_in_input_order_from_chunks(local_backend: dict[str, Any]) -> None:
    run = cflow.submit(lambda x: x * x, range(23), chunk_size=5, **local_backend)
    assert list(run.results()) == [x * x for x in range(23)]
    shards = _chunks(run)
    assert [s.params["chunk"]["count"] for s in shards] == [5, 5, 5, 5, 3]
    progress = run.progress()
    assert (progress.total, progress.succeeded, progress.failed) == (23, 23, 0)


def test_an_item_that_crashes_its_process_fails_alone_in_its_chunk(
    backend: dict[str, Any],
) -> None:
    """An item that ends the process running it (``os._exit``, a segfault) or calls
    ``sys.exit`` kills its chunk's first attempt whole; from the second on each item runs in
    a process of its own, so that item fails alone, saying how its process ended, and its
    chunk's other items keep their values (before, every item of the chunk failed)."""
    values = cflow.map(crashes, range(12), chunk_size=4, return_exceptions=True, **backend)
    failed = {i: v for i, v in enumerate(values) if isinstance(v, cflow.ShardFailed)}
    assert sorted(failed) == [5, 9, 10]
    assert [v for i, v in enumerate(values) if i not in failed] == [
        x * 10 for x in range(12) if x not in failed
    ]
    assert failed[5].type_name == "ItemCrashed" and "exited with code 3" in failed[5].message
    assert failed[9].type_name == "ItemCrashed" and "killed by SIGSEGV" in failed[9].message
    assert isinstance(failed[10].exception, SystemExit) and failed[10].exception.code == 4
    assert failed[5].log_tail.strip().splitlines()[-1] == "item 5 starting"  # its own part


def test_an_item_past_its_timeout_fails_alone_in_its_chunk(backend: dict[str, Any]) -> None:
    """``timeout`` is each item's: one that runs past it fails alone (``ItemTimedOut``) and its
    chunk's other items keep their values, where the chunk's attempt, timed as that many
    times its items, used to run on until all of it had passed (a chunk of 250 items with an
    hour each: ten days). Item 2 is interrupted where it sleeps; item 6 ignores the alarm, so
    its chunk's attempt runs out and the next runs each item in a process of its own, which is
    killed at the timeout."""
    start = time.monotonic()
    values = cflow.map(
        hangs, range(8), chunk_size=4, timeout=1, retries=1, return_exceptions=True, **backend
    )  # fmt: skip
    took = time.monotonic() - start
    failed = {i: v for i, v in enumerate(values) if isinstance(v, cflow.ShardFailed)}
    assert sorted(failed) == [2, 6], values
    assert [values[i] for i in (0, 1, 3, 4, 5, 7)] == [0, 1, 3, 4, 5, 7]
    # Interrupted where it hung: its traceback says where.
    assert isinstance(failed[2].exception, cflow.ItemTimedOut), failed[2].type_name
    assert "timeout of 1 s" in failed[2].message and "time.sleep(600)" in failed[2].traceback
    assert failed[6].type_name == "ItemTimedOut" and "was killed" in failed[6].message
    assert took < 60  # not the sleeps' 600 s


def test_an_item_alone_in_its_shard_past_its_timeout_fails_as_one_in_a_chunk(
    local_backend: dict[str, Any],
) -> None:
    """The same ``ItemTimedOut`` however the items are chunked (alone in its shard, its
    attempt's timeout was a ``ShardError: timed out after 1s``)."""
    (failed,) = cflow.map(
        hangs, [2], chunk_size=1, timeout=1, retries=0, return_exceptions=True, **local_backend
    )  # fmt: skip
    assert isinstance(failed.exception, cflow.ItemTimedOut), failed.type_name
    assert failed.type_name == "worker.pyfunc.chunk.ItemTimedOut"
    assert failed.message == "it ran past its timeout of 1 s"


def test_a_failing_item_fails_only_itself_in_its_chunk(backend: dict[str, Any]) -> None:
    run = cflow.submit(check, range(8), chunk_size=4, retries=1, **backend)
    seen: dict[int, int] = {}
    with pytest.raises(cflow.ShardFailed) as completed:
        for item, value in run.as_completed():
            seen[item] = value
    # Per item, in chunk order, up to the failing one. The other chunk runs on the other worker
    # and may commit first: then all of it, in order, before the failure.
    assert completed.value.index == 2 and all(seen[item] == item for item in seen)
    assert [item for item in seen if item < 4] == [0, 1]
    assert [item for item in seen if item >= 4] in ([], [4, 5, 6, 7])
    with pytest.raises(cflow.ShardFailed) as first:
        run.results()
    assert first.value.index == 2  # the first failure in input order
    values = run.results(return_exceptions=True)
    assert [values[i] for i in (0, 1, 4, 5, 6, 7)] == [0, 1, 4, 5, 6, 7]
    rejected, unloadable = values[2], values[3]
    assert isinstance(rejected, cflow.ShardFailed) and rejected.index == 2
    assert isinstance(rejected.exception, Rejected) and rejected.exception.why == (
        "two is not welcome"
    )
    assert "raise Rejected" in rejected.traceback
    # Its own part of the chunk's log: its two tries, the retry said, nothing of item 3.
    assert rejected.log_tail.count("about to reject 2") == 2
    assert "item 2 raised" in rejected.log_tail and "running it again" in rejected.log_tail
    assert isinstance(unloadable, cflow.ShardFailed) and unloadable.index == 3
    assert isinstance(unloadable.exception, cflow.RemoteError)
    assert "about to reject" not in unloadable.log_tail
    assert unloadable.shard_id == rejected.shard_id  # both in the first chunk, committed
    progress = run.progress()
    assert (progress.total, progress.succeeded, progress.failed) == (8, 6, 2)


def test_as_completed_yields_each_item_of_each_chunk(local_backend: dict[str, Any]) -> None:
    run = cflow.submit(lambda s: s.upper(), list("abcdefghij"), chunk_size=3, **local_backend)
    assert dict(run.as_completed()) == {c: c.upper() for c in "abcdefghij"}
    assert len(_chunks(run)) == 4


def test_an_item_that_raises_once_is_run_again_in_its_chunk(
    local_backend: dict[str, Any], tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()

    def flaky(x: int) -> int:
        if x == 4 and not (marks / "tried").exists():
            (marks / "tried").touch()
            raise OSError("the first try of 4 fails")
        (marks / f"ran-{x}").touch()
        return x

    run = cflow.submit(flaky, range(10), chunk_size=5, retries=2, **local_backend)
    assert list(run.results()) == list(range(10))
    assert len(list(marks.glob("ran-*"))) == 10  # the chunk was not run again whole


def test_a_chunk_whose_attempt_dies_fails_its_items_with_the_reason(
    local_backend: dict[str, Any],
) -> None:
    def dies(x: int) -> int:
        if x == 6:
            os._exit(3)  # the task process ends: the whole attempt of its chunk with it
        return x

    run = cflow.submit(dies, range(10), chunk_size=5, retries=0, **local_backend)
    values = run.results(return_exceptions=True)
    assert list(values[:5]) == [0, 1, 2, 3, 4]
    for index in range(5, 10):
        failed = values[index]
        assert isinstance(failed, cflow.ShardFailed) and failed.index == index
        assert "items 5 to 9 ran as one chunk" in failed.message
    progress = run.progress()
    assert (progress.total, progress.succeeded, progress.failed) == (10, 5, 5)


def test_the_cache_reruns_only_the_chunk_of_a_changed_item(
    local_backend: dict[str, Any], tmp_path: Path
) -> None:
    marks = tmp_path / "calls"
    marks.mkdir()

    def counted(x: int) -> int:
        (marks / f"{x}-{len(list(marks.iterdir()))}").touch()
        return x + 1

    items = list(range(20))
    assert list(cflow.map(counted, items, chunk_size=5, cache=True, **local_backend)) == [
        x + 1 for x in items
    ]
    assert len(list(marks.iterdir())) == 20
    for mark in marks.iterdir():
        mark.unlink()
    items[7] = 107
    # Another timeout for each item changes nothing a committed value stands on.
    run = cflow.submit(counted, items, chunk_size=5, cache=True, timeout=99, **local_backend)
    assert list(run.results()) == [x + 1 for x in items]
    assert sorted(int(p.name.split("-")[0]) for p in marks.iterdir()) == [5, 6, 8, 9, 107]
    assert run.progress().cached == 15


def test_a_chunked_run_is_seen_by_runner_status(
    local_backend: dict[str, Any], tmp_path: Path
) -> None:
    run = cflow.submit(lambda x: -x, range(12), chunk_size=4, **local_backend)
    assert list(run.results()) == [-x for x in range(12)]
    status = Cli(tmp_path).status(run.id)
    assert status["state"] == "finished"
    assert len(status["shards"]) == 3
    attached = cflow.attach(run.id, store=local_backend["store"])
    assert list(attached.results()) == [-x for x in range(12)]  # per item, from the store
    assert attached.progress().total == 12


def test_the_chunk_size_is_chosen_from_the_items_and_the_workers() -> None:
    assert Chunking.pick(range(2000), None, slots=2, tries=1).size(0) == MAX_CHUNK
    million = Chunking.pick(range(10**6), None, slots=2, tries=1)  # at most MAX_CHUNKS chunks
    assert million.size(0) == million.largest == 10**6 // MAX_CHUNKS
    assert million.at_least() == MAX_CHUNKS
    assert Chunking.pick(range(80), None, slots=2, tries=1).size(0) == 10  # 4 per slot
    small = Chunking.pick(range(5), None, slots=2, tries=1)
    assert not small.chunked  # one shard per item: today's form
    assert not Chunking.pick(range(2000), 1, slots=2, tries=1).chunked
    stream = Chunking.pick(iter(range(10**6)), None, slots=2, tries=1)
    assert stream.chunked and stream.size(0) == 1  # a generator's first chunks are small
    assert stream.size(800) == 100 and stream.size(10**5) == MAX_CHUNK  # grows to the cap
    assert stream.largest == MAX_CHUNK
    with pytest.raises(ConfigError, match="chunk_size=0: give a whole number"):
        Chunking.pick(range(3), 0, slots=2, tries=1)


def test_how_many_chunks_at_least_is_known_from_the_items_count() -> None:
    assert Chunking.pick(range(2000), None, slots=2, tries=1).at_least() == 8  # 250 each
    assert Chunking.pick(range(23), 5, slots=2, tries=1).at_least() == 5
    assert Chunking.pick(range(0), None, slots=2, tries=1).at_least() == 0
    assert Chunking.pick(iter(range(10)), None, slots=2, tries=1).at_least() is None
    assert ItemFeed(range(7), Chunking.pick(range(7), 1, slots=2, tries=1)).at_least() == 7
    assert ItemFeed(iter(range(7))).at_least() is None


def test_a_run_of_known_length_has_all_its_first_workers_as_it_is_made(
    local_backend: dict[str, Any],
) -> None:
    """2,000 items on two workers are 8 chunks: both workers start before the run is made,
    neither waiting for the watch's first look (a generator's run starts one then: its length
    is not known)."""
    store = Path(local_backend["store"])
    run = cflow.submit(abs, range(2000), **local_backend)
    assert len(list((store / "fleet" / "live").glob("*.json"))) == 2
    assert list(run.results()) == list(range(2000))


def test_a_value_only_cloudpickle_can_pickle_comes_back_from_a_chunk(
    local_backend: dict[str, Any],
) -> None:
    makers = cflow.map(lambda x: lambda: x + 1, range(6), chunk_size=3, **local_backend)
    assert [make() for make in makers] == [1, 2, 3, 4, 5, 6]


def test_the_cache_runs_again_a_chunk_whose_item_failed(
    local_backend: dict[str, Any], tmp_path: Path
) -> None:
    fixed = tmp_path / "fixed"

    def fragile(x: int) -> int:
        if x == 1 and not fixed.exists():
            raise ValueError("not yet")
        return x

    first = cflow.map(
        fragile,
        range(6),
        chunk_size=3,
        retries=0,
        cache=True,
        return_exceptions=True,
        **local_backend,
    )
    assert isinstance(first[1], cflow.ShardFailed)
    fixed.touch()
    run = cflow.submit(fragile, range(6), chunk_size=3, retries=0, cache=True, **local_backend)
    assert list(run.results()) == list(range(6))
    assert run.progress().cached == 3  # the chunk without a failure only


def test_a_chunk_whose_items_all_succeeded_keeps_their_values_in_one_list(
    local_backend: dict[str, Any],
) -> None:
    run = cflow.submit(
        check, [1, 4, 5, 3, 6, 7], chunk_size=3, retries=0, halt="never", **local_backend
    )
    values = run.results(return_exceptions=True)
    assert [values[i] for i in (0, 1, 2, 4, 5)] == [1, 4, 5, 6, 7]
    assert isinstance(values[3], cflow.ShardFailed)
    records = [
        ShardResult.from_json(run._store.get(Layout.result(run.id, s.id))).value["chunk"]
        for s in _chunks(run)
    ]
    assert CHUNK_PICKLES in records[0] and "values" not in records[0]  # 1, 4, 5: all values
    assert "values" in records[1] and CHUNK_PICKLES not in records[1]  # 3 failed: an entry each
    progress = run.progress()
    assert (progress.succeeded, progress.failed) == (5, 1)


def test_big_items_and_values_of_a_chunk_go_by_the_store(local_backend: dict[str, Any]) -> None:
    items = [bytes([i]) * 30_000 for i in range(4)]  # 120 KB of items: over a chunk's params
    run = cflow.submit(lambda b: b * 2, items, chunk_size=4, **local_backend)
    assert list(run.results()) == [b * 2 for b in items]  # 240 KB of values: output files
    (chunk,) = _chunks(run)
    assert chunk.input is not None and "items" not in chunk.params
    assert dict(run.as_completed()) == {b: b * 2 for b in items}


def test_values_a_chunks_record_has_no_room_for_share_one_file(
    local_backend: dict[str, Any],
) -> None:
    """60 values of 1.5 KB: the chunk's record holds the first ones, the rest go in one file
    of the chunk (not a file each), and every one comes back in its place."""
    run = cflow.submit(lambda i: str(i) * 1500, range(60), chunk_size=60, **local_backend)
    assert list(run.results()) == [str(i) * 1500 for i in range(60)]
    kept = Path(local_backend["store"]) / "runs" / run.id / "shards"
    assert len(list(kept.rglob("values.pkl"))) == 1
    assert not list(kept.rglob("value-*.pkl"))
    assert dict(run.as_completed()) == {i: str(i) * 1500 for i in range(60)}


def test_a_value_that_will_not_pickle_fails_only_its_item(local_backend: dict[str, Any]) -> None:
    import threading

    def odd(x: int) -> Any:
        return threading.Lock() if x == 1 else x  # a lock pickles with neither pickler

    values = cflow.map(
        odd, range(4), chunk_size=4, retries=0, return_exceptions=True, **local_backend
    )
    assert [values[i] for i in (0, 2, 3)] == [0, 2, 3]
    assert isinstance(values[1], cflow.ShardFailed) and "lock" in values[1].message


def test_the_task_is_packed_once_a_map(
    local_backend: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle described before the run is the one stored (packing again cost a large task
    folder its gzip twice)."""
    import runner.engine.plan as plan

    packed: list[bytes] = []

    def counted(folder: Path) -> tuple[bytes, str]:
        data, sha = pack(folder)
        packed.append(data)
        return data, sha

    import runner.engine.stream as stream

    for module in (plan, runs, stream):  # wherever a folder was packed on the way
        monkeypatch.setattr(module, "pack", counted, raising=False)
    run = cflow.submit(lambda x: -x, range(5), **local_backend)
    assert list(run.results()) == [0, -1, -2, -3, -4]
    assert len(packed) == 1
    bundle = runs.load_manifest(run._store, run.id).bundle
    assert run._store.get(Layout.bundle(bundle)) == packed[0]


def test_a_chunk_of_thousands_of_items_keeps_their_entries_in_a_file(
    backend: dict[str, Any], tmp_path: Path
) -> None:
    # 3,000 items' entries are more than a chunk's record holds (64 KiB of JSON): every item
    # failed with "run(shard) returned ... bytes of JSON" before.
    fixed = tmp_path / "fixed"

    def fragile(x: int) -> int:
        if x == 1234 and not fixed.exists():
            raise ValueError("not yet")
        return x * 3

    run = cflow.submit(
        fragile, range(6000), chunk_size=3000, retries=0, cache=True, halt="never", **backend
    )
    values = run.results(return_exceptions=True)
    assert isinstance(values[1234], cflow.ShardFailed) and "not yet" in str(values[1234])
    assert [v for i, v in enumerate(values) if i != 1234] == [
        x * 3 for x in range(6000) if x != 1234
    ]
    progress = run.progress()
    assert (progress.succeeded, progress.failed) == (5999, 1)
    assert dict(run.as_completed(return_exceptions=True))[5999] == 17997
    fixed.touch()  # the chunk holding the failure runs again; the other is reused
    again = cflow.submit(fragile, range(6000), chunk_size=3000, retries=0, cache=True, **backend)
    assert list(again.results()) == [x * 3 for x in range(6000)]
    assert again.progress().cached == 3000
