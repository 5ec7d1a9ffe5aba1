"""A generator of 100,000 items: published as it is read, in flat memory, the run started
before it ends (tests/api/stream_script.py, in a process of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.engine.runs import iter_shards, load_manifest
from runner.engine.stream import _Reader, start_stream
from tests.e2e.conftest import Cli, wait_for
from worker.backends.local.backend import open_local
from worker.clock import SYSTEM_CLOCK, FakeClock
from worker.protocol import RunOptions, Shard
from worker.store import Store

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).with_name("stream_script.py")
REPO = Path(__file__).resolve().parents[2]
# Generous (about twice what streaming takes): the 100,000 items alone, held as objects, take
# 28 MiB, with their shards far more. The figures belong to the benchmark.
PEAK_BOUND_KIB = 20 * 1024


def test_a_generator_of_100000_items_streams_in_flat_memory(tmp_path: Path) -> None:
    store = tmp_path / ".cflow"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(store)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    # Every item was published (the last one only after a first item had committed).
    assert got["total"] == 100_000, done.stderr
    assert got["peak_kib"] < PEAK_BOUND_KIB, got
    cli = Cli(tmp_path)
    status = cli("runs", "--json")
    assert status.code == 0 and got["run"] in status.stdout


class _GatedFeed:
    """Items 0..n-1; after ``hold`` of them, the stream waits for ``go``."""

    def __init__(self, n: int, hold: int):
        self.n, self.hold = n, hold
        self.go = threading.Event()

    def stopped(self) -> bool:
        return False

    def in_memory(self) -> bool:
        return False  # it waits

    def shards(self, store: Store, run_id: str) -> Iterator[Shard]:
        for i in range(self.n):
            if i == self.hold:
                assert self.go.wait(30), "the test never let the stream go on"
            yield Shard(id=f"{i:05d}", index=i, params={"index": i})


def test_a_stream_counts_one_more_shard_until_it_ends(tmp_path: Path) -> None:
    backends = open_local(tmp_path / ".cflow")
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    feed = _GatedFeed(2500, hold=1500)
    manifest, publisher = start_stream(
        store=backends.store,
        queue=backends.queue,
        task_dir=task,
        feed=feed,
        options=RunOptions(),
    )
    run_id = manifest.run_id
    # The first batch: full, or cut short by its age on a slow machine; one more counted.
    assert 0 < manifest.published <= 1000 and manifest.shard_count == manifest.published + 1
    assert manifest.publishing  # so the run cannot look settled while the stream is open
    # The second batch is cut short by the wait: published, the stream still open.
    cli = Cli(tmp_path)
    seen = wait_for(
        lambda: (m := load_manifest(backends.store, run_id)).published == 1500 and m, 30, "1500"
    )
    assert seen.shard_count == 1501 and seen.publishing
    assert "publishing (1500/1501)" in cli("runs").stdout
    feed.go.set()
    assert publisher.join(30) and publisher.error is None
    done = load_manifest(backends.store, run_id)
    assert (done.published, done.shard_count, done.publishing) == (2500, 2500, False)
    listed = [s.id for s in iter_shards(backends.store, run_id)]
    assert listed == [f"{i:05d}" for i in range(2500)]
    backends.close()


def test_cancel_stops_a_stream_that_stalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cflow

    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    never = threading.Event()

    def stalls() -> Iterator[int]:
        yield 1
        never.wait(120)  # a generator waiting on something that does not come
        yield 2

    run = cflow.submit(str, stalls(), store=tmp_path / ".cflow", workers=1)
    run.cancel()  # returns although the generator still waits: its thread is let be
    progress = run.progress()
    assert progress.cancelled and progress.total == 1 and not progress.publishing
    never.set()


def _numbered(n: int) -> Iterator[Shard]:
    for i in range(n):
        yield Shard(id=f"{i:05d}", index=i, params={"index": i})


def test_a_stream_in_memory_is_read_in_the_callers_thread_until_a_second_batch() -> None:
    """A list's shards: the first batch read where it is asked for (no thread, so none to
    start and hand the GIL to); a second batch from a reading thread, in order."""
    small = _Reader(_numbered(8), first_inline=True)
    first = small.batch(SYSTEM_CLOCK, lambda: False)
    assert [s.index for s in first] == list(range(8)) and first.ended
    assert small._thread is None
    assert small.batch(SYSTEM_CLOCK, lambda: False).ended

    large = _Reader(_numbered(2500), first_inline=True)
    got = large.batch(SYSTEM_CLOCK, lambda: False)
    assert len(got) == 1000 and not got.ended and large._thread is None
    while not (more := large.batch(SYSTEM_CLOCK, lambda: False)).ended or more:
        got.extend(more)
    assert large._thread is not None
    assert [s.index for s in got] == list(range(2500))


def test_what_a_stream_in_memory_raises_is_raised_once_what_came_before_went_out() -> None:
    def failing() -> Iterator[Shard]:
        yield from _numbered(3)
        raise ValueError("item 3 will not pickle")

    reader = _Reader(failing(), first_inline=True)
    first = reader.batch(SYSTEM_CLOCK, lambda: False)
    assert [s.index for s in first] == [0, 1, 2]
    assert isinstance(reader.failed, ValueError)
    with pytest.raises(ValueError, match="item 3"):
        reader.batch(SYSTEM_CLOCK, lambda: False)


def test_a_slow_stream_in_memory_sends_its_first_batch_once_it_is_a_batch_time_old() -> None:
    """Large items are stored as they are read: the first batch goes out what was read within
    a batch's time, as the reading thread's would."""
    clock = FakeClock()

    def slow() -> Iterator[Shard]:
        for shard in _numbered(2500):
            clock.advance(0.1)  # each shard a tenth of a second to read
            yield shard

    reader = _Reader(slow(), first_inline=True)
    first = reader.batch(clock, lambda: False)
    assert len(first) == 3 and not first.ended  # 0.1, 0.2, then 0.3 s: past BATCH_SECONDS
    assert [s.index for s in first] == [0, 1, 2]


def test_a_stream_whose_queue_runs_dry_between_batches_keeps_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue running dry while the items are still being read is no end of the run: its
    idle workers stay for the next batch, rather than being stopped and others started for
    it (on Google Cloud, VMs deleted and booted again). Items of 10 KB, each chunk's stored as
    it is read, are read slower than two workers take them: the queue runs dry often."""
    import os

    import cflow

    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    store = tmp_path / ".cflow"
    items = (os.urandom(10_000) for _ in range(10_000))
    values = cflow.map(len, items, store=store, workers=2, progress=False)
    assert set(values) == {10_000} and len(values) == 10_000
    started = sorted(p.name for p in (store / "fleet" / "logs").glob("*.log"))
    assert len(started) == 2, started


def _slow(x: int) -> int:
    time.sleep(0.01)
    return x


def test_an_endless_stream_is_read_only_so_far_ahead_of_its_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endless iterable was read as fast as it gave: 19 million items in 20 s, for the
    3,600 one worker had run, and the store filled the disk with them."""
    import itertools

    import cflow
    from runner.engine.stream import AHEAD

    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    store = tmp_path / ".cflow"
    run = cflow.submit(_slow, itertools.count(), store=store, workers=1, chunk_size=1)
    backends = open_local(store)
    try:
        wait_for(lambda: load_manifest(backends.store, run.id).published >= AHEAD, 60, "AHEAD")
        time.sleep(2.0)  # unbound, a generator this fast gives millions in that time
        published = load_manifest(backends.store, run.id).published
        assert published < AHEAD + 1000 + 200, published  # a batch past it, and what ran
    finally:
        run.cancel()  # an endless run: this process's exit would wait for it for ever
        backends.close()


def test_a_batch_committed_before_its_count_is_written_does_not_end_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's messages go out before the manifest counts them: workers may commit them
    first. Seen so, a stale count made the run look settled, and it was recorded finished with
    the rest of its items never read (1 in 15 runs of a cancel test under load)."""
    import cflow
    from cflow.driver import let_go
    from runner.engine import runs

    real = runs.update_manifest

    def counted_late(store: Store, run_id: str, change: Any) -> Any:
        if threading.current_thread().name == "cflow-publish":
            time.sleep(0.8)  # the batch is out and committed by now; its count is not written
        return real(store, run_id, change)

    monkeypatch.setattr(runs, "update_manifest", counted_late)

    def slowly() -> Iterator[int]:
        for i in range(8):
            time.sleep(0.1)
            yield i

    values = cflow.map(abs, slowly(), store=str(tmp_path / ".cflow"), workers=2)
    assert let_go()
    assert list(values) == list(range(8))
