"""Google Cloud API calls per shard, and shards/s, on the emulators with 4 workers.

    python bench/gcp_calls.py [--shards 200] [--workers 4] [--quick]

One ``runner submit --shards N --workers W`` of a Python task that writes one small output, on
the Pub/Sub emulator and fake-gcs-server, with the fake Compute API starting real
``python -m worker --backend gcp`` processes as its VMs. Every process (the runner and each
worker) runs with a ``sitecustomize`` that counts its gRPC calls by method (Pub/Sub) and its
HTTP requests by kind (Cloud Storage, Compute), and writes the counts when it exits.

Prints Cloud Storage operations per shard on the workers, excluding the task's own reads and
writes (the target is at most 6, with no listing per shard), Pub/Sub calls per shard, the
runner's own calls, and the throughput: shards/s from the first attempt's start to the last
commit, and for the whole command (group start-up and scale-down included). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import REPO, parse_args, start_emulators

sys.path.insert(0, str(REPO))  # the emulator helpers and the fake Compute API live with the tests

from tests import emulators
from tests.gcp.conftest import worker_env, worker_spawner
from tests.gcp.fake_compute import FakeCompute

GROUP, ZONE = "cflow-bench", "us-central1-a"

TASK = """
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "out.txt").write_text(f"{shard.index}\\n")
"""

# Loaded by every Python process started with this directory on PYTHONPATH.
SITECUSTOMIZE = r'''
import atexit, json, os, re, sys
from collections import Counter

COUNTS = Counter()
_NAME = re.compile(rb'"name"\s*:\s*"([^"]+)"')


def _kind(method, url, body):
    """Cloud Storage request -> "gcs <op>", with the task's own objects told apart."""
    path = url.split("?", 1)[0]
    query = url.split("?", 1)[1] if "?" in url else ""
    if "/upload/storage/v1/" in path:
        match = _NAME.search(body[:4096]) if isinstance(body, bytes) else None
        name = match.group(1).decode() if match else ""
        if "uploadType=resumable" in query and method == "PUT":
            return "gcs upload (resumable data)"
        task = "/out/" in name or "/inputs/" in name
        create = "ifGenerationMatch=0" in query
        op = "create" if create else "upload"
        return f"gcs {op}{' (task output)' if task else ''}"
    if "/download/storage/v1/" in path or "alt=media" in query:
        return "gcs download"
    if path.endswith("/o"):
        return "gcs list"
    if "/o/" in path:
        return f"gcs object {method.lower()}"
    return f"gcs {method.lower()} {path.rsplit('/storage/v1', 1)[-1]}"


def _install():
    try:
        import requests
    except ImportError:
        return
    gcs = os.environ.get("STORAGE_EMULATOR_HOST", "").rstrip("/")
    compute = os.environ.get("CFLOW_COMPUTE_ENDPOINT", "").rstrip("/")
    original = requests.Session.request

    def request(self, method, url, *args, **kwargs):
        url_s = str(url)
        if gcs and url_s.startswith(gcs):
            body = kwargs.get("data")
            COUNTS[_kind(method.upper(), url_s, body if isinstance(body, bytes) else b"")] += 1
        elif compute and url_s.startswith(compute):
            path = url_s.split("?", 1)[0]
            verb = path.rsplit("/", 1)[-1]
            if "/operations/" in path:
                verb = "operations " + ("wait" if verb == "wait" else "get")
            elif path.endswith("/instanceGroupManagers/" + verb):
                verb = "get group"
            COUNTS[f"compute {verb}"] += 1
        return original(self, method, url, *args, **kwargs)

    requests.Session.request = request

    import grpc

    class Counting(
        grpc.UnaryUnaryClientInterceptor,
        grpc.UnaryStreamClientInterceptor,
        grpc.StreamUnaryClientInterceptor,
        grpc.StreamStreamClientInterceptor,
    ):
        def _count(self, details):
            COUNTS["pubsub " + details.method.rsplit("/", 1)[-1]] += 1

        def intercept_unary_unary(self, continuation, details, request):
            self._count(details)
            return continuation(details, request)

        def intercept_unary_stream(self, continuation, details, request):
            self._count(details)
            return continuation(details, request)

        def intercept_stream_unary(self, continuation, details, requests_):
            self._count(details)
            return continuation(details, requests_)

        def intercept_stream_stream(self, continuation, details, requests_):
            self._count(details)
            return continuation(details, requests_)

    for name in ("insecure_channel", "secure_channel"):
        make = getattr(grpc, name)

        def wrapped(*args, _make=make, **kwargs):
            return grpc.intercept_channel(_make(*args, **kwargs), Counting())

        setattr(grpc, name, wrapped)


def _dump():
    if not COUNTS:
        return
    argv0 = sys.argv[0] if sys.argv else ""
    role = "worker" if "worker" in argv0 and "zygote" not in argv0 else "runner"
    if "runner" not in argv0 and role == "runner":
        role = "other"
    out = os.path.join(os.environ["CFLOW_BENCH_COUNTS"], f"{role}-{os.getpid()}.json")
    with open(out, "w") as fh:
        json.dump(dict(COUNTS), fh)


if os.environ.get("CFLOW_BENCH_COUNTS"):
    _install()
    atexit.register(_dump)
'''


def _collect(folder: Path) -> dict[str, Counter[str]]:
    totals: dict[str, Counter[str]] = {}
    for path in folder.glob("*.json"):
        role = path.name.split("-", 1)[0]
        totals.setdefault(role, Counter()).update(json.loads(path.read_text()))
    return totals


def _span(results: list[dict[str, Any]]) -> float:
    return max(r["finished_at"] for r in results) - min(r["started_at"] for r in results)


def _submit(
    d: emulators.Deployment, work: Path, env: dict[str, str], args: argparse.Namespace
) -> tuple[float, list[dict[str, Any]]]:
    """One ``runner submit`` on the emulators and a fake group: its wall time and the commits."""
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        d,
        logs=work / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
        idle_timeout=120,
        env=env,
    )
    fake = FakeCompute(project=d.project, group=GROUP, spawn=spawn, zone=ZONE).start()
    holder["endpoint"] = fake.endpoint
    try:
        (work / "task").mkdir()
        (work / "task" / "task.py").write_text(TASK)
        outputs = work / "cflow-outputs.json"
        outputs.write_text(json.dumps(d.outputs(zone=ZONE, group=GROUP)))
        runner_env = worker_env(
            fake.endpoint, CFLOW_BACKEND="gcp", CFLOW_DEPLOYMENT=str(outputs), **env
        )
        start = time.perf_counter()
        submit = ["submit", str(work / "task"), "--shards", str(args.shards)]
        proc = subprocess.run(
            [sys.executable, "-m", "runner", *submit, "--workers", str(args.workers)],
            cwd=work,
            env=runner_env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"runner submit failed ({proc.returncode}):\n{proc.stderr}")
        run_id = proc.stdout.strip().splitlines()[0]
        for vm in fake.live().values():  # the workers write their counts as they exit
            with contextlib.suppress(subprocess.TimeoutExpired):
                vm.wait(60)
        from worker.backends.gcp.gcs import GcsStore, make_client

        store = GcsStore(d.bucket, client=make_client(d.project))
        results = [
            json.loads(store.get(k))
            for k in store.list(f"runs/{run_id}/shards/", suffix="/result.json")
        ]
    finally:
        fake.stop()
    return wall, results


def _report(totals: dict[str, Counter[str]], n: int) -> None:
    worker, runner = totals.get("worker", Counter()), totals.get("runner", Counter())
    print(f"\n{'calls per shard':<44}{'workers':>10}{'runner':>10}")
    for key in sorted(set(worker) | set(runner)):
        print(f"  {key:<42}{worker[key] / n:>10.2f}{runner[key] / n:>10.2f}")

    def gcs(counter: Counter[str], *, task: bool) -> int:
        return sum(v for k, v in counter.items() if k.startswith("gcs") and ("task" in k) == task)

    def pubsub(counter: Counter[str]) -> int:
        return sum(v for k, v in counter.items() if k.startswith("pubsub"))

    print(
        f"\nCloud Storage ops per shard on workers, excluding the task's own: "
        f"{gcs(worker, task=False) / n:.2f} (target <= 6); task's own: "
        f"{gcs(worker, task=True) / n:.2f}"
    )
    print(f"bucket listings by workers: {worker['gcs list']} (target 0 per shard)")
    print(f"Cloud Storage ops per shard by the runner: {gcs(runner, task=False) / n:.2f}")
    print(
        f"Pub/Sub calls per shard: workers {pubsub(worker) / n:.2f}, "
        f"runner {pubsub(runner) / n:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    args = parse_args(parser, argv, shards=10, workers=2)

    work = Path(tempfile.mkdtemp(prefix="cflow-bench-gcp-"))
    hooks, counts = work / "hooks", work / "counts"
    hooks.mkdir()
    counts.mkdir()
    (hooks / "sitecustomize.py").write_text(textwrap.dedent(SITECUSTOMIZE))
    env = {"CFLOW_BENCH_COUNTS": str(counts), "PYTHONPATH": f"{hooks}:{REPO}"}
    emus = start_emulators(reuse=args.quick)
    try:
        wall, results = _submit(emulators.new_deployment(), work, env, args)
    finally:
        emus.stop()
    n = args.shards
    print(f"{n} shards, {args.workers} workers (1 slot each), {len(results)} committed")
    _report(_collect(counts), n)
    print(
        f"\nthroughput: {n / _span(results):.1f} shards/s from first start to last commit; "
        f"{n / wall:.1f} shards/s for the whole command ({wall:.1f} s)"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
