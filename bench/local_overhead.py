"""The local backend's overhead per shard against peers doing the same work at parallelism 2.

    python bench/local_overhead.py [--shards 2000] [--repeat 3]

1. A no-op ``task.sh`` over N shards: ``runner submit`` (2 workers) against GNU parallel -j2 and
   ``xargs -P2`` running the same script. Target: no slower than GNU parallel.
2. A no-op Python ``run(shard)`` over N shards: ``runner submit`` (2 workers) against
   ``multiprocessing.Pool(2)``, which keeps nothing durable. Target: within 5x of the pool, with
   every result committed to the store.

Each figure is the best of ``--repeat`` wall-clock runs of the whole command (start-up included),
divided by the shard count. The store lives under ``--work`` (default ``bench/out/`` in the
checkout, where a user's ``./.cflow`` would be). Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _runner(task: Path, shards: int, work: Path) -> Callable[[], None]:
    def go() -> None:
        store = work / "store"
        shutil.rmtree(store, ignore_errors=True)
        env = {**os.environ, "CFLOW_STORE": str(store), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "runner",
                "submit",
                str(task),
                "--shards",
                str(shards),
                "--workers",
                "2",
            ],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise SystemExit(f"runner submit failed:\n{proc.stderr[-2000:]}")
        run_id = proc.stdout.strip()
        committed = len(list((store / "runs" / run_id / "shards").glob("*/result.json")))
        if committed != shards:
            raise SystemExit(f"only {committed} of {shards} shards committed")

    return go


def _noop(i: int) -> int:
    return i


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "bench" / "out",
        help="where the store goes (default: inside the checkout, as ./.cflow would be)",
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    n = args.shards
    rows: list[tuple[str, str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cflow-bench-", dir=args.work) as tmp:
        work = Path(tmp)
        sh_task = work / "sh-task"
        sh_task.mkdir()
        (sh_task / "task.sh").write_text("#!/usr/bin/env bash\ntrue\n")
        (sh_task / "task.sh").chmod(0o755)
        py_task = work / "py-task"
        py_task.mkdir()
        (py_task / "task.py").write_text("def run(shard):\n    pass\n")
        script = str(sh_task / "task.sh")
        seq = "".join(f"{i}\n" for i in range(n))

        rows.append(
            ("shell", "cflow local, 2 workers", _best(_runner(sh_task, n, work), args.repeat))
        )
        if shutil.which("parallel"):
            rows.append(
                (
                    "shell",
                    "GNU parallel -j2",
                    _best(
                        lambda: subprocess.run(
                            ["parallel", "-j2", script, ":::", *map(str, range(n))],
                            check=True,
                            capture_output=True,
                        ),
                        args.repeat,
                    ),
                )
            )
        else:
            print("GNU parallel not found (apt-get install parallel): skipped", file=sys.stderr)
        rows.append(
            (
                "shell",
                "xargs -P2",
                _best(
                    lambda: subprocess.run(
                        ["xargs", "-P2", "-n1", script],
                        input=seq,
                        text=True,
                        check=True,
                        capture_output=True,
                    ),
                    args.repeat,
                ),
            )
        )

        rows.append(
            ("python", "cflow local, 2 workers", _best(_runner(py_task, n, work), args.repeat))
        )

        def pool() -> None:
            with multiprocessing.Pool(2) as p:
                p.map(_noop, range(n), chunksize=1)

        rows.append(("python", "multiprocessing.Pool(2)", _best(pool, args.repeat)))

    per = {(kind, name): total / n * 1000 for kind, name, total in rows}
    print(f"{'task':8} {'runner':28} {'total s':>8} {'ms/shard':>9}")
    for kind, name, total in rows:
        print(f"{kind:8} {name:28} {total:8.2f} {per[(kind, name)]:9.3f}")
    cflow_sh = per[("shell", "cflow local, 2 workers")]
    cflow_py = per[("python", "cflow local, 2 workers")]
    ratios = {}
    if ("shell", "GNU parallel -j2") in per:
        ratios["shell: cflow / GNU parallel (target <= 1)"] = (
            cflow_sh / per[("shell", "GNU parallel -j2")]
        )
    ratios["shell: cflow / xargs -P2"] = cflow_sh / per[("shell", "xargs -P2")]
    ratios["python: cflow / Pool (target <= 5)"] = (
        cflow_py / per[("python", "multiprocessing.Pool(2)")]
    )
    for name, value in ratios.items():
        print(f"{name:45} {value:6.2f}x")
    print(
        json.dumps(
            {
                "shards": n,
                "ms_per_shard": {f"{k[0]}/{k[1]}": round(v, 3) for k, v in per.items()},
                "ratios": {k: round(v, 2) for k, v in ratios.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
