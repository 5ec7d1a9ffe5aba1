"""``runner status RUN --json`` on a large local run: wall time and peak memory.

Writes a synthetic run into a temporary local store the way workers leave it (per shard an
attempt claim and a ``result.json``; every 100th shard a failed first attempt too), then runs
the real CLI in a subprocess with stdout to a file, and prints its time, peak RSS and output size.

    .venv/bin/python bench/status_json.py [--shards 100000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, parse_args

sys.path.insert(0, str(REPO))

from worker.backends.local.store import LocalStore
from worker.protocol import (
    AttemptStatus,
    Layout,
    Manifest,
    Shard,
    ShardResult,
    shard_id_for_index,
)


def make_run(root: Path, shards: int) -> str:
    store = LocalStore(root)
    run_id = "r20260101-000000-bench0"
    listing = [
        Shard(id=shard_id_for_index(i, shards), index=i, params={"index": i}) for i in range(shards)
    ]
    store.put(Layout.shard_list(run_id), b"".join(s.to_json() + b"\n" for s in listing))
    for s in listing:
        attempt = 1
        if s.index % 100 == 0:
            failed = AttemptStatus(run_id, s.id, 1, "failed", "w", 1.0, 2.0, 1, "ValueError: x")
            store.put(Layout.status(run_id, s.id, 1), failed.to_json())
            attempt = 2
        claim = AttemptStatus(run_id, s.id, attempt, "running", "w", 2.0)
        store.put(Layout.status(run_id, s.id, attempt), claim.to_json())
        result = ShardResult(run_id, s.id, attempt, "w", 2.0, 3.0, outputs=["o.txt"])
        store.put(Layout.result(run_id, s.id), result.to_json())
    manifest = Manifest(run_id=run_id, bundle="0" * 64, entry="python", shard_count=shards)
    store.put(Layout.manifest(run_id), manifest.to_json())
    return run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=100_000)
    args = parse_args(parser, argv, shards=200)
    with tempfile.TemporaryDirectory(prefix="cflow-status-bench-") as tmp:
        root = Path(tmp) / ".cflow"
        started = time.perf_counter()
        run_id = make_run(root, args.shards)
        print(f"wrote a {args.shards:,}-shard run in {time.perf_counter() - started:.1f}s")
        env = {**os.environ, "CFLOW_STORE": str(root), "PYTHONPATH": str(REPO)}
        out = Path(tmp) / "status.json"
        started = time.perf_counter()
        with out.open("wb") as fh:
            subprocess.run(
                [sys.executable, "-m", "runner", "status", run_id, "--json"],
                env=env,
                stdout=fh,
                check=True,
            )
        took = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        data = json.loads(out.read_text())
        assert len(data["shards"]) == args.shards and data["counts"]["succeeded"] == args.shards
        print(
            f"status --json: {took:.1f}s, peak RSS {peak_kib / 1024:.0f} MiB,"
            f" {out.stat().st_size / 1e6:.1f} MB of JSON"
        )


if __name__ == "__main__":
    main()
