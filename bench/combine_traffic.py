"""Runner bytes downloaded per combined byte, combining in the bucket on fake-gcs-server.

A run's committed parts are written straight into the bucket layout (N shards, one CSV part of
about S bytes each), then ``combine_run`` concatenates them with Cloud Storage compose. Printed
per case: bytes the runner downloaded and uploaded, compose calls, and downloaded bytes per
combined byte, with and without declared headers, and with ``--out DIR`` (which downloads the
combined result itself, by request). The last case runs ``runner combine`` with the header-less
copies made by real worker processes in a fake instance group (a helper run), as on Google Cloud
above 256 MiB of copies.

    .venv/bin/python bench/combine_traffic.py [--shards 125] [--part-kb 256] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, parse_args, start_emulators

sys.path.insert(0, str(REPO))  # the emulator helpers and the fake Compute API live with the tests

from runner.backends.gcp.combine import BucketCombiner
from runner.results.combine import combine_run
from runner.results.parts import OutTarget
from tests import emulators
from tests.gcp.conftest import worker_env, worker_spawner
from tests.gcp.fake_compute import FakeCompute
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.bundle import pack
from worker.protocol import Layout, Manifest, Shard, ShardResult


def _run(store: GcsStore, shards: int, part_bytes: int, headers: bool, tag: str) -> Manifest:
    with tempfile.TemporaryDirectory() as tmp:
        task = Path(tmp)
        (task / "task.py").write_text("def run(shard):\n    pass\n")
        if headers:
            (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
        data, sha = pack(task)
    store.put(Layout.bundle(sha), data)
    run_id = f"r-bench-{tag}"
    listing = [Shard(id=f"{i:05d}", index=i) for i in range(shards)]
    store.put(Layout.shard_list(run_id), b"".join(s.to_json() + b"\n" for s in listing))
    row = b"12345,0.123456789,some-text-value\n"
    body = row * max(part_bytes // len(row), 1)
    for s in listing:
        store.put(Layout.outputs(run_id, s.id, 1) + "part.csv", b"id,value,text\n" + body)
        result = ShardResult(run_id, s.id, 1, "w", 0.0, 1.0, outputs=["part.csv"])
        store.create(Layout.result(run_id, s.id), result.to_json())
    manifest = Manifest(run_id=run_id, bundle=sha, entry="python", shard_count=shards)
    store.put(Layout.manifest(run_id), manifest.to_json())
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=125)
    parser.add_argument("--part-kb", type=int, default=256)
    args = parse_args(parser, argv, shards=4, part_kb=4)
    emus = start_emulators(reuse=args.quick)
    try:
        _cases(emulators.new_deployment(), args)
    finally:
        emus.stop()


def _cases(d: emulators.Deployment, args: argparse.Namespace) -> None:
    """Every case of the table, on one deployment."""
    store = GcsStore(d.bucket, client=make_client(d.project))
    print(f"{args.shards} parts of ~{args.part_kb} KiB on fake-gcs-server")
    print(f"{'case':<28} {'combined':>12} {'downloaded':>12} {'uploaded':>12} {'calls':>6}"
          f" {'down/combined':>14} {'seconds':>8}")  # fmt: skip
    for headers in (False, True):
        m = _run(store, args.shards, args.part_kb * 1024, headers, "h" if headers else "n")
        for out in (None, "dir"):
            with tempfile.TemporaryDirectory() as tmp:
                target = OutTarget(path=Path(tmp)) if out else None
                started = time.perf_counter()
                result = combine_run(store, m, out=target, combiner=BucketCombiner())
                took = time.perf_counter() - started
                size = sum(int(store.checksums(k)[k][0]) for k in result.files)
            t = result.traffic
            down = t.downloaded + t.downloaded_for_copy
            case = f"headers={'yes' if headers else 'no '} --out {'DIR' if out else '-  '}"
            _row(case, size, down, t.uploaded, t.compose_calls, took)
    m = _run(store, args.shards, args.part_kb * 1024, True, "w")
    traffic, took = _on_workers(d, m.run_id)
    size = sum(n for k, (n, _) in store.checksums(f"runs/{m.run_id}/combined/").items())
    down = traffic["downloaded"] + traffic["downloaded_for_copy"]
    _row("headers=yes on workers", size, down, traffic["uploaded"], traffic["compose_calls"], took)


def _row(case: str, size: int, down: int, up: int, calls: int, took: float) -> None:
    ratio = down / size
    print(f"{case:<28} {size:>12,} {down:>12,} {up:>12,} {calls:>6} {ratio:>14.4f} {took:>8.2f}")


def _on_workers(d: emulators.Deployment, run_id: str) -> tuple[dict[str, int], float]:
    """``runner combine`` with every header-less copy made by workers in a fake group."""
    group, zone = "cflow-bench", "us-central1-a"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        holder: dict[str, str] = {}
        spawn = worker_spawner(
            d, logs=work / "vms", group=group, zone=zone, endpoint=lambda: holder["endpoint"]
        )
        fake = FakeCompute(project=d.project, group=group, spawn=spawn, zone=zone).start()
        holder["endpoint"] = fake.endpoint
        try:
            outputs = work / "cflow-outputs.json"
            outputs.write_text(json.dumps(d.outputs(zone=zone, group=group)))
            env = worker_env(
                fake.endpoint,
                CFLOW_BACKEND="gcp",
                CFLOW_DEPLOYMENT=str(outputs),
                CFLOW_COMBINE_ON_WORKERS_BYTES="0",
            )
            started = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "runner", "combine", run_id],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=900,
            )
            took = time.perf_counter() - started
        finally:
            fake.stop()
    if proc.returncode != 0:
        sys.exit(f"runner combine failed ({proc.returncode}):\n{proc.stderr}")
    line = proc.stderr.rsplit("traffic: ", 1)[1].splitlines()[0]
    return json.loads(line), took


if __name__ == "__main__":
    main()
