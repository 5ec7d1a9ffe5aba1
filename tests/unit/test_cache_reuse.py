"""The cross-run cache's reuse on the local store: the watcher counts reused shards at its next
poll, keying and reusing in two threads at once, the environment a key covers, the links."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from runner.engine import runs
from runner.engine.cache import ALL_KEYS, ShardCache, keys_prefix
from runner.engine.fingerprint import task_env
from runner.engine.watch import Watcher
from worker.agent.files import local_seen
from worker.backends.local.backend import open_local
from worker.backends.local.store import LocalStore
from worker.clock import FakeClock
from worker.protocol import Layout, Manifest, RunOptions, Shard, ShardResult, new_run_id


def _shards(n: int) -> list[Shard]:
    return [Shard(id=f"{i:05d}", index=i, params={"index": i}) for i in range(n)]


def _task(tmp_path: Path) -> Path:
    task = tmp_path / "task"
    task.mkdir(exist_ok=True)
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    return task


def _committed_run(store: LocalStore, shards: list[Shard], clock: FakeClock) -> str:
    """An earlier run whose every shard committed, its keys in the index."""
    run_id = new_run_id(clock.time())
    cache = ShardCache(store, code="c")
    batch = list(cache.keyed(shards))
    assert cache.reuse(run_id, batch) == set()
    store.create_many(
        {
            Layout.result(run_id, s.id): ShardResult(
                run_id=run_id,
                shard_id=s.id,
                attempt=1,
                worker="w",
                started_at=clock.time(),
                finished_at=clock.time(),
            ).to_json()
            for s in shards
        }
    )
    return run_id


def test_a_watcher_counts_reused_shards_at_its_next_poll(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    clock = FakeClock()
    shards = _shards(1500)
    _committed_run(b.store, shards, clock)
    clock.advance(2)  # the rerun is a second younger: its id sorts after
    runs_task = _task(tmp_path)
    cache = ShardCache(b.store, code="c")
    manifest = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=runs_task,
        shards=iter(()),
        options=RunOptions(),
        clock=clock,
    )
    manifest = runs.update_manifest(
        b.store,
        manifest.run_id,
        lambda m: Manifest.from_dict({**m.to_dict(), "shard_count": 1500, "published": 0}),
    )
    watcher = Watcher(
        manifest=manifest,
        store=b.store,
        queue=b.queue,
        events=b.events,
        clock=clock,
        reused=cache.take_reused,
    )
    assert watcher.poll().succeeded == 0  # its first, full reconcile
    reconciles = watcher.reconciles
    runs.publish_rest(
        b.store,
        b.queue,
        manifest,
        lambda n: cache.recorded(),
        clock=clock,
        shards=cache.keyed(shards),
        reuse=cache.reuse,
    )
    assert cache.cached == 1500 and b.queue.stats(manifest.run_id).queued == 0
    snapshot = watcher.poll()  # the clock stood still: no reconcile, no event
    assert watcher.reconciles == reconciles
    assert snapshot.succeeded == 1500 and snapshot.finished
    b.close()


def test_reused_ids_wait_for_the_manifest_to_count_their_batch(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    clock = FakeClock()
    shards = _shards(10)
    _committed_run(b.store, shards, clock)
    clock.advance(2)
    cache = ShardCache(b.store, code="c")
    assert len(cache.reuse(new_run_id(clock.time()), list(cache.keyed(shards)))) == 10
    assert cache.take_reused() == []  # the manifest does not count them yet
    cache.recorded()
    assert sorted(cache.take_reused()) == [s.id for s in shards]
    assert cache.take_reused() == []
    b.close()


def test_keying_and_reusing_in_two_threads_at_once(tmp_path: Path) -> None:
    """A stream keys its shards in its reading thread while its publishing thread reuses the
    first batch (and records every key known so far)."""
    store = LocalStore(tmp_path / "store")
    cache = ShardCache(store, code="c")
    first = _shards(20_000)
    list(cache.keyed(first))
    keying = threading.Event()

    def more() -> Iterator[Shard]:
        for i in range(20_000, 200_000):
            if i == 20_100:
                keying.set()
            yield Shard(id=f"{i:06d}", index=i, params={"index": i})

    errors: list[BaseException] = []

    def key_more() -> None:
        try:
            for _ in cache.keyed(more()):
                pass
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=key_more)
    thread.start()
    assert keying.wait(30)
    run_id = new_run_id()
    try:
        cache.reuse(run_id, first[:1000])  # raised "dictionary changed size during iteration"
    finally:
        thread.join()
    assert errors == []
    rows = store.get(keys_prefix(run_id) + ALL_KEYS).decode().splitlines()
    assert len(rows) >= 20_000 and all(json.loads(r)["key"] for r in rows)


def test_a_kernel_restart_keeps_the_keys() -> None:
    """What a Jupyter server or kernel restart changes is left out of the key's environment;
    what reaches a task's result stays in."""
    before = {"HOME": "/h", "MPLBACKEND": "module://x", "JPY_PARENT_PID": "101"}
    before |= {"JPY_SESSION_NAME": "/a.ipynb", "IPY_INTERRUPT_EVENT": "7", "KERNEL_ID": "k1"}
    before |= {"PYTHONUNBUFFERED": "1", "JPY_INTERRUPT_EVENT": "7"}
    after = {"HOME": "/h", "MPLBACKEND": "module://x", "JPY_PARENT_PID": "202"}
    after |= {"JPY_SESSION_NAME": "/b.ipynb", "KERNEL_ID": "k2"}
    assert task_env(before, inherited=True) == {"HOME": "/h", "MPLBACKEND": "module://x"}
    assert task_env(before, inherited=True) == task_env(after, inherited=True)
    shard = Shard(id="s", index=0, params={"index": 0})

    def key(environ: dict[str, str]) -> str | None:
        cache = ShardCache(None, code="c", env=task_env(environ, inherited=True))  # type: ignore[arg-type]
        return cache._key(shard, {})[0]

    assert key(before) == key(after)
    assert key(before) != key({**after, "MPLBACKEND": "agg"})


def test_copy_many_links_into_new_folders_and_names_missing_sources(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    for i in range(3):
        store.put(f"runs/a/shards/{i}/attempts/1/out/f.csv", f"{i}\n".encode())
    store.put("runs/b/shards/1/attempts/0/out/f.csv", b"left by a copy cut short\n")
    pairs = [
        (f"runs/a/shards/{i}/attempts/1/out/f.csv", f"runs/b/shards/{i}/attempts/0/out/f.csv")
        for i in range(4)
    ]
    assert store.copy_many(pairs) == {"runs/a/shards/3/attempts/1/out/f.csv"}
    for i in range(3):
        src, dst = (store.root / k for k in pairs[i])
        assert dst.read_text() == f"{i}\n" and os.path.samefile(src, dst)
    store.delete_prefix("runs/a/")
    assert (store.root / pairs[0][1]).read_text() == "0\n"  # outlives the run it came from


def test_a_watcher_sees_a_streams_end_at_its_next_poll(tmp_path: Path) -> None:
    """A stream that ends on a batch boundary records its end in a write of its own, with no
    shard and no event: the watcher reads it at its next poll, not at a reconcile."""
    b = open_local(tmp_path / "store")
    clock = FakeClock()
    shards = _shards(3)
    cache = ShardCache(b.store, code="c")
    manifest = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=_task(tmp_path),
        shards=iter(shards),
        options=RunOptions(),
        clock=clock,
    )
    open_count = runs.update_manifest(  # 3 published, the stream still open
        b.store, manifest.run_id, lambda m: Manifest.from_dict({**m.to_dict(), "shard_count": 4})
    )
    watcher = Watcher(
        manifest=open_count,
        store=b.store,
        queue=b.queue,
        events=b.events,
        clock=clock,
        reused=cache.take_reused,
    )
    watcher.poll()
    b.store.create_many(
        {
            Layout.result(manifest.run_id, s.id): ShardResult(
                run_id=manifest.run_id,
                shard_id=s.id,
                attempt=1,
                worker="w",
                started_at=clock.time(),
                finished_at=clock.time(),
            ).to_json()
            for s in shards
        }
    )
    for s in shards:
        watcher.view.succeed(s.id)  # as their events said
    assert not watcher.poll().finished  # 3 of 4: the stream is open
    runs.update_manifest(
        b.store, manifest.run_id, lambda m: Manifest.from_dict({**m.to_dict(), "shard_count": 3})
    )
    reconciles = watcher.reconciles
    assert watcher.poll().finished and watcher.reconciles == reconciles
    b.close()


def test_a_commit_is_reused_only_where_its_attempt_found_the_input_as_it_was_keyed(
    tmp_path: Path,
) -> None:
    """The key covers the input's content when the submit hashed it; an attempt records the
    input's stat at its start and end. A commit whose attempt found another stat (the input
    changed between the submit and the attempt), or that recorded none (made before the
    record), is passed over; one that found it as keyed is reused, and so is its copy."""
    b = open_local(tmp_path / "store")
    clock = FakeClock()
    data = tmp_path / "x.txt"
    data.write_text("A\n")
    shard = Shard(id="x", index=0, input=str(data))

    def submit() -> tuple[str, set[str]]:
        clock.advance(2)  # each run a second younger: its id sorts after
        run_id = new_run_id(clock.time())
        cache = ShardCache(b.store, code="c")
        return run_id, cache.reuse(run_id, list(cache.keyed([shard])))

    def commit(run_id: str, seen: list[str | None] | None) -> None:  # a worker's winner
        record = ShardResult(run_id, "x", 1, "w", 0.0, 1.0, input_seen=seen)
        b.store.create(Layout.result(run_id, "x"), record.to_json())

    def source(run_id: str) -> str | None:
        return ShardResult.from_json(b.store.get(Layout.result(run_id, "x"))).cached_from

    old, reused = submit()
    commit(old, None)  # its attempt recorded nothing
    late, reused = submit()
    assert reused == set()
    data.write_text("B\n")  # after the submit hashed A, before the attempt read it
    os.utime(data, ns=(1, 1))  # a stat of its own, whatever the clock's grain
    commit(late, [local_seen(shard)] * 2)
    data.write_text("A\n")  # A again: the key of both runs
    third, reused = submit()
    assert reused == set()  # neither commit vouches for A
    commit(third, [local_seen(shard)] * 2)
    fourth, reused = submit()
    assert reused == {"x"} and source(fourth) == f"{third}/x"
    fifth, reused = submit()  # the copy carries the stat its own key was made with
    assert reused == {"x"} and source(fifth) == f"{fourth}/x"
    b.close()
