"""What a container costs per shard: a container per attempt against a warm container per slot.

    python bench/container_overhead.py [--shards 40] [--many 400] [--repeat 2] [--direct 20]
                                       [--quick]

Two parts, side by side in the same run, on the test images (``tests/containers/images.py``,
built on first use: busybox for ``task.sh``, Debian's python3 for ``task.py``):

1. Whole runs through the CLI on the local backend, 1 worker, no-op shards: without an image,
   with ``--image`` (``task.py``: a warm container per slot), and with ``--image --isolate`` (a
   container per attempt). Each is timed at 1 shard and at N shards (the best of ``--repeat``
   whole commands each): the fixed cost is t(1), the cost per extra shard (t(N) - t(1)) / (N - 1).
   N is ``--shards`` with a container per attempt and ``--many`` otherwise: a few milliseconds a
   shard are lost in a run's fixed cost (about 2.5 s here, give or take 0.5) at 40 shards.
2. The executor alone (:class:`worker.executors.container.executor.ContainerExecutor`), no
   queue or store: the median of ``--direct`` no-op Python shards, each started and waited for,
   in a container per attempt and in a warm one (whose first shard, the container's start, is
   shown apart).

Prints tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, cannot_run, parse_args

sys.path.insert(0, str(REPO))  # the test images are built by the tests' own helpers

from tests.containers.images import ImageBuildError, busybox_image, python_image
from worker.bundle import UnpackedBundle
from worker.executors.container.executor import ContainerExecutor
from worker.executors.container.runtime import (
    ContainerRuntimeMissing,
    Runtime,
    detect_runtime,
)
from worker.protocol import Entry
from worker.taskapi import TaskShard


def _submit(task: Path, shards: int, image: str | None, work: Path, *flags: str) -> float:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    argv = [sys.executable, "-m", "runner", "submit", str(task), "--shards", str(shards)]
    argv += ["--workers", "1", "--store", str(store), *flags]
    argv += ["--image", image] if image else []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=work)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return took


def _direct(
    runtime: Runtime, image: str, task: Path, work: Path, n: int, isolate: bool
) -> list[float]:
    """Seconds per shard, started and waited for one at a time on one slot."""
    executor = ContainerExecutor(
        UnpackedBundle("0" * 64, task, None), Entry.PYTHON, image, runtime=runtime, isolate=isolate
    )
    slot = work / f"slot-{int(isolate)}"
    slot.mkdir()
    times = []
    try:
        for i in range(n):
            shard = TaskShard("r-bench", f"s{i}", i, 1, None, slot / f"out-{i}")
            began = time.perf_counter()
            code = executor.start(shard, slot / f"log-{i}.txt").wait(120)
            times.append(time.perf_counter() - began)
            if code != 0:
                raise SystemExit(f"shard failed: {(slot / f'log-{i}.txt').read_text()[-300:]}")
    finally:
        executor.close()
    return times


def _engine() -> tuple[Runtime, dict[str, str]]:
    """This machine's container engine and the test images on it (built on first use)."""
    try:
        runtime = detect_runtime()
        print(f"engine: {runtime.describe()}", file=sys.stderr)
        return runtime, {"shell": busybox_image(runtime), "python": python_image(runtime)}
    except (ContainerRuntimeMissing, ImageBuildError) as exc:
        cannot_run(str(exc))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--many", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--direct", type=int, default=20)
    args = parse_args(parser, argv, shards=2, many=3, repeat=1, direct=2)
    runtime, images = _engine()
    with tempfile.TemporaryDirectory(prefix="cflow-bench-") as tmp:
        work = Path(tmp)
        tasks = {"shell": work / "sh", "python": work / "py"}
        tasks["shell"].mkdir()
        (tasks["shell"] / "task.sh").write_text('echo "$CFLOW_SHARD_ID" > "$CFLOW_OUTPUT_DIR/o"\n')
        tasks["python"].mkdir()
        (tasks["python"] / "task.py").write_text("def run(shard):\n    pass\n")

        def cost(n: int, kind: str, image: str | None, *flags: str) -> tuple[int, float, float]:
            """N, the fixed cost (s) and the cost per extra shard (ms) of one configuration."""
            one = min(_submit(tasks[kind], 1, image, work, *flags) for _ in range(args.repeat))
            many = min(_submit(tasks[kind], n, image, work, *flags) for _ in range(args.repeat))
            return n, one, (many - one) * 1000 / (n - 1)

        few, lots = args.shards, args.many
        rows = {
            "shell, no image": cost(lots, "shell", None),
            "shell, container per attempt": cost(few, "shell", images["shell"]),
            "python, no image (warm host)": cost(lots, "python", None),
            "python, container per attempt": cost(few, "python", images["python"], "--isolate"),
            "python, warm container": cost(lots, "python", images["python"]),
        }
        print(f"whole runs, 1 and N shards, 1 worker, best of {args.repeat}")
        print(f"{'':32} {'N':>5} {'fixed s':>8} {'ms per extra shard':>19}")
        for name, (n, fixed, extra) in rows.items():
            print(f"{name:32} {n:5d} {fixed:8.2f} {extra:19.1f}")

        per_attempt = _direct(runtime, images["python"], tasks["python"], work, args.direct, True)
        warm = _direct(runtime, images["python"], tasks["python"], work, args.direct, False)
        print(f"\nexecutor alone, {args.direct} no-op python shards, one at a time (ms per shard)")
        print(f"{'':22} {'median':>8} {'min':>8} {'max':>8}")
        for name, times in (("container per attempt", per_attempt), ("warm container", warm[1:])):
            ms = [t * 1000 for t in times]
            print(f"{name:22} {statistics.median(ms):8.2f} {min(ms):8.2f} {max(ms):8.2f}")
        print(f"{'(warm: its first shard, the container start)':46} {warm[0] * 1000:8.1f}")


if __name__ == "__main__":
    main()
