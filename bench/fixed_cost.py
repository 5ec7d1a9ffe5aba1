"""Where a short local run's fixed cost goes: a timeline of ``runner submit``, from its own records.

    python bench/fixed_cost.py [--shards 2000] [--runs 5] [--quick]

Runs ``runner submit TASK --shards N --workers 2`` of a no-op ``task.py`` ``--runs`` times and
prints, for each moment, the median seconds from the command's start: when the run's manifest
was made (the runner's imports, the task's import check and the bundle are before it), when the
workers' agents were up (``fleet/<worker>/lifetime.json``), the first shard's start, the last
shard's end, the workers' stop (their ``stopped`` events) and the command's exit. Side by side in
the same rounds, the floors: a bare ``python -c pass`` and ``python -m runner --version``.
Nothing is asserted; this machine is noisy, so read the medians with the rounds beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, compile_project, parse_args


def _submit(task: Path, shards: int, work: Path) -> dict[str, float]:
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, "CFLOW_STORE": str(store), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "runner", "submit", str(task), "--shards", str(shards)]
    start = time.time()
    proc = subprocess.run(
        [*argv, "--workers", "2"], cwd=work, env=env, capture_output=True, text=True
    )
    end = time.time()
    if proc.returncode != 0:
        raise SystemExit(f"runner submit failed:\n{proc.stderr[-2000:]}")
    run_id = proc.stdout.strip().splitlines()[0]
    conn = sqlite3.connect(store / "queue.db")
    try:
        rows = conn.execute("SELECT at, body FROM events WHERE run_id = ?", (run_id,)).fetchall()
        stopped = conn.execute(
            'SELECT MAX(at) FROM events WHERE body LIKE \'%"kind":"stopped"%\''
        ).fetchone()[0]
    finally:
        conn.close()
    manifest = json.loads((store / "runs" / run_id / "run.json").read_text())
    kinds = [(at, json.loads(body)["kind"]) for at, body in rows]
    starts = [at for at, kind in kinds if kind == "started"]
    ends = [at for at, kind in kinds if kind == "succeeded"]
    if len(ends) != shards:
        raise SystemExit(f"{len(ends)} of {shards} shards succeeded")
    booted = [
        json.loads(path.read_text())["started_at"]
        for path in (store / "fleet").glob("*/lifetime.json")
    ]
    return {
        "manifest made": manifest["created_at"] - start,
        "first worker up": min(booted) - start,
        "last worker up": max(booted) - start,
        "first shard starts": min(starts) - start,
        "last shard ends": max(ends) - start,
        "workers stopped": (stopped or end) - start,
        "command exits": end - start,
        "fixed cost": (min(starts) - start) + (end - max(ends)),
    }


def _timed(argv: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=REPO / "bench" / "out")
    args = parse_args(parser, argv, shards=20, runs=1)
    compile_project()
    args.work.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cflow-fixed-", dir=args.work) as tmp:
        work = Path(tmp)
        task = work / "task"
        task.mkdir()
        (task / "task.py").write_text("def run(shard):\n    pass\n")
        for _ in range(args.runs):
            for name, value in _submit(task, args.shards, work).items():
                figures.setdefault(name, []).append(value)
            figures.setdefault("floor: python -c pass", []).append(
                _timed([sys.executable, "-c", "pass"], work)
            )
            figures.setdefault("floor: runner --version", []).append(
                _timed([sys.executable, "-m", "runner", "--version"], work)
            )
    print(f"runner submit --shards {args.shards} --workers 2, {args.runs} rounds")
    print(f"{'moment (s from the command start)':<36} {'median':>7}  rounds")
    for name, values in figures.items():
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(f"{name:<36} {statistics.median(values):>7.3f}  {rounds}")
    print(json.dumps({k: round(statistics.median(v), 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
