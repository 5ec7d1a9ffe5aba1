"""What a container costs per attempt: ``runner submit --image`` against the same run without.

    python bench/container_overhead.py [--shards 40] [--repeat 3]

A no-op ``task.sh`` (busybox image) and a no-op ``task.py`` (Debian python3 image) over N shards,
1 worker, through the CLI on the local backend, with and without ``--image``. The images are the
test images (``tests/containers/images.py``), built on first use. Each figure is the best of
``--repeat`` whole-command runs divided by the shard count. Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.containers.images import busybox_image, python_image  # noqa: E402
from worker.container_runtime import detect_runtime  # noqa: E402


def _submit(task: Path, shards: int, image: str | None, work: Path) -> float:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    argv = [sys.executable, "-m", "runner", "submit", str(task), "--shards", str(shards)]
    argv += ["--workers", "1", "--store", str(store)] + (["--image", image] if image else [])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=work)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {proc.stderr.strip().splitlines()[-1:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runtime = detect_runtime()
    print(f"engine: {runtime.describe()}", file=sys.stderr)
    images = {"shell": busybox_image(runtime), "python": python_image(runtime)}
    with tempfile.TemporaryDirectory(prefix="cflow-bench-") as tmp:
        work = Path(tmp)
        tasks = {"shell": work / "sh", "python": work / "py"}
        tasks["shell"].mkdir()
        (tasks["shell"] / "task.sh").write_text('echo "$CFLOW_SHARD_ID" > "$CFLOW_OUTPUT_DIR/o"\n')
        tasks["python"].mkdir()
        (tasks["python"] / "task.py").write_text("def run(shard):\n    pass\n")
        print(f"{'task':8} {'without image':>15} {'with image':>12} {'extra':>9}  (ms per shard)")
        for kind, task in tasks.items():
            plain = min(_submit(task, args.shards, None, work) for _ in range(args.repeat))
            boxed = min(_submit(task, args.shards, images[kind], work) for _ in range(args.repeat))
            per = 1000 / args.shards
            print(f"{kind:8} {plain * per:15.1f} {boxed * per:12.1f} {(boxed - plain) * per:9.1f}")


if __name__ == "__main__":
    main()
