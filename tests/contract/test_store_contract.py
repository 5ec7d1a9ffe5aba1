"""What every Store must do: atomic puts, create-only commits, listing, streaming files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from worker.backends.base import Backends
from worker.backends.local.store import LocalStore
from worker.errors import NotFound

REPO = Path(__file__).resolve().parents[2]


def test_put_get_roundtrip_and_overwrite(backends: Backends) -> None:
    store = backends.store
    store.put("runs/r1/run.json", b'{"a": 1}')
    assert store.get("runs/r1/run.json") == b'{"a": 1}'
    store.put("runs/r1/run.json", b'{"a": 2}')
    assert store.get("runs/r1/run.json") == b'{"a": 2}'
    assert store.exists("runs/r1/run.json")


def test_missing_object_raises_not_found(backends: Backends, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        backends.store.get("runs/nope/run.json")
    with pytest.raises(NotFound):
        backends.store.get_file("runs/nope/run.json", tmp_path / "x")
    assert not backends.store.exists("runs/nope/run.json")


def test_get_many_reads_records_and_objects_and_leaves_out_the_missing(backends: Backends) -> None:
    store = backends.store
    keys = [f"runs/r9/shards/{i:04d}/result.json" for i in range(503)]  # past a query's chunk
    for i, key in enumerate(keys):
        assert store.create(key, f"r{i}".encode())
    store.put("runs/r9/outputs/a.csv", b"x,y\n")
    wanted = [*keys, "runs/r9/outputs/a.csv", "runs/r9/shards/nope/result.json", "runs/r9/b"]
    found = store.get_many(wanted)
    assert found == {**{k: f"r{i}".encode() for i, k in enumerate(keys)}, wanted[-3]: b"x,y\n"}
    assert store.get_many([]) == {}


def test_get_range_reads_a_piece_and_nothing_past_the_end(backends: Backends) -> None:
    """A log is read a piece at a time as it grows (``runner logs``): never all of it."""
    store = backends.store
    key = "runs/r8/shards/a/attempts/1/log.txt"
    store.put(key, b"0123456789")
    assert store.get_range(key, 0, 4) == b"0123"
    assert store.get_range(key, 8, 4) == b"89"
    assert store.get_range(key, 10, 4) == b""  # at the end: nothing yet (Cloud Storage: 416)
    assert store.get_range(key, 25, 4) == b""
    store.create("runs/r8/shards/a/result.json", b"result")  # a record (locally a row)
    assert store.get_range("runs/r8/shards/a/result.json", 2, 3) == b"sul"
    with pytest.raises(NotFound):
        store.get_range("runs/r8/shards/nope/attempts/1/log.txt", 0, 4)


def test_create_is_create_only(backends: Backends) -> None:
    store = backends.store
    assert store.create("runs/r2/shards/a/result.json", b"first")
    assert not store.create("runs/r2/shards/a/result.json", b"second")
    assert store.get("runs/r2/shards/a/result.json") == b"first"


def test_racing_creates_have_exactly_one_winner(backends: Backends) -> None:
    store = backends.store
    wins: list[int] = []
    barrier = threading.Barrier(6)

    def attempt(n: int) -> None:
        barrier.wait()
        if store.create("runs/r3/shards/a/result.json", f"attempt {n}".encode()):
            wins.append(n)

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get("runs/r3/shards/a/result.json") == f"attempt {wins[0]}".encode()


RACER = """
import json, sys, time
from pathlib import Path

spec, n = json.loads(sys.argv[1]), int(sys.argv[2])
if spec["root"]:
    from worker.backends.local.store import LocalStore
    store = LocalStore(Path(spec["root"]))
else:
    from worker.backends.gcp.gcs import GcsStore, make_client
    store = GcsStore(spec["bucket"], client=make_client(spec["project"]))
store.exists(spec["key"])  # connected: opening is not part of the race
Path(spec["ready"], str(n)).touch()
while not Path(spec["go"]).exists():
    time.sleep(0.001)
print("won" if store.create(spec["key"], f"process {n}".encode()) else "lost", flush=True)
"""


def test_racing_creates_from_separate_processes_have_exactly_one_winner(
    backends: Backends, tmp_path: Path
) -> None:
    """As workers race: each its own process and its own connection to the store."""
    store = backends.store
    ready, go = tmp_path / "ready", tmp_path / "go"
    ready.mkdir()
    spec = {
        "root": str(store.root) if isinstance(store, LocalStore) else None,
        "bucket": getattr(store, "bucket_name", None),
        "project": getattr(getattr(store, "client", None), "project", None),
        "key": "runs/r3/shards/b/result.json",
        "ready": str(ready),
        "go": str(go),
    }
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, json.dumps(spec), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    try:
        while len(list(ready.iterdir())) < len(racers):  # every racer connected
            assert all(r.poll() is None for r in racers), "a racer ended before the start"
            time.sleep(0.01)
        go.touch()
        said = [r.communicate(timeout=120)[0].strip() for r in racers]
    finally:
        for r in racers:
            r.kill()
            r.wait()
    assert sorted(said) == ["lost", "lost", "lost", "won"]
    assert store.get(spec["key"]) == f"process {said.index('won')}".encode()


def test_list_is_recursive_filtered_and_prefix_exact(backends: Backends) -> None:
    store = backends.store
    keys = [
        "runs/r4/shards/a/result.json",
        "runs/r4/shards/a/attempts/1/status.json",
        "runs/r4/shards/b/failed.json",
        "runs/r4x/shards/c/result.json",
    ]
    for key in keys:
        store.put(key, b"{}")
    assert sorted(store.list("runs/r4/")) == sorted(keys[:3])
    assert list(store.list("runs/r4/", suffix="/result.json")) == ["runs/r4/shards/a/result.json"]
    assert sorted(store.list("runs/r4")) == sorted(keys)
    assert list(store.list("runs/none/")) == []


def test_files_stream_in_and_out(backends: Backends, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    payload = bytes(range(256)) * 40_000  # 10 MB
    src.write_bytes(payload)
    backends.store.put_file("runs/r5/shards/a/attempts/1/out/big.bin", src)
    dst = tmp_path / "back.bin"
    backends.store.get_file("runs/r5/shards/a/attempts/1/out/big.bin", dst)
    assert dst.read_bytes() == payload


def test_delete_removes_and_tolerates_missing(backends: Backends) -> None:
    store = backends.store
    store.put("runs/r6/shards/a/failed.json", b"{}")
    store.delete("runs/r6/shards/a/failed.json")
    assert not store.exists("runs/r6/shards/a/failed.json")
    store.delete("runs/r6/shards/a/failed.json")


def test_url_names_the_object(backends: Backends) -> None:
    assert "runs/r7/run.json" in backends.store.url("runs/r7/run.json")
