"""How soon a local worker's shard runs again after the worker is killed.

    python bench/recovery.py [--runs 5] [--signal KILL|TERM] [--quick]

Each run is one ``runner submit`` of 2 shards at 2 workers, with the default 60 s lease, of a
task that runs until the benchmark releases it (a flag file). Once both attempts run, one worker
gets the signal; the figure is the time from the signal to the start of that shard's next
attempt (its next attempt record); then the task is released and the run ends. Without the
local fleet releasing a dead worker's leases a SIGKILLed worker's shard would wait out its lease
(60 s); the target is 2 s. A SIGTERMed worker gives its shard back itself, at once.

Prints each run's figure and the median. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, parse_args

# Runs until the benchmark creates the flag file (at most two minutes).
TASK = """
import time
from pathlib import Path

RELEASE = Path({release!r})


def run(shard):
    deadline = time.monotonic() + 120
    while not RELEASE.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
"""


def _attempts(store: Path) -> list[dict[str, Any]]:
    try:
        with sqlite3.connect(store / "queue.db", timeout=30) as db:
            rows = db.execute("SELECT data FROM records WHERE key LIKE '%/status.json'").fetchall()
    except sqlite3.Error:
        return []
    return [json.loads(bytes(data)) for (data,) in rows]


def _wait(predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise SystemExit("timed out")


def once(sig: signal.Signals) -> float:
    with tempfile.TemporaryDirectory(prefix="cflow-bench-recovery-") as tmp:
        root = Path(tmp)
        (root / "task").mkdir()
        release = root / "release"
        (root / "task" / "task.py").write_text(TASK.format(release=str(release)))
        store = root / ".cflow"
        env = {**os.environ, "CFLOW_STORE": str(store), "PYTHONPATH": str(REPO)}
        env.pop("CFLOW_LEASE_SECONDS", None)  # the default lease: what a release saves
        log = root / "runner.log"
        with log.open("wb") as out:
            argv = ["submit", "task", "--shards", "2", "--workers", "2"]
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner", *argv], cwd=root, env=env, stdout=out, stderr=out
            )
        try:
            running = _wait(lambda: len(_attempts(store)) == 2 and _attempts(store), 60)
            victim = running[0]
            entry = store / "fleet" / "live" / f"{victim['worker']}.json"
            pid = json.loads(entry.read_text())["pid"]
            killed = time.time()
            os.kill(pid, sig)
            again = _wait(
                lambda: [
                    a
                    for a in _attempts(store)
                    if a["shard_id"] == victim["shard_id"] and a["attempt"] > victim["attempt"]
                ],
                120,
            )
            figure = float(again[0]["started_at"]) - killed
        finally:
            release.touch()
            code = proc.wait(timeout=180)
        if code != 0:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"runner submit exited with {code}, the run did not recover:\n{tail}")
    return figure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM"])
    args = parse_args(parser, argv, runs=1)
    sig = signal.Signals[f"SIG{args.signal}"]
    figures = []
    for n in range(args.runs):
        figures.append(once(sig))
        print(f"run {n + 1}: SIG{args.signal} -> shard running again in {figures[-1]:.2f} s")
    print(
        f"median {statistics.median(figures):.2f} s, max {max(figures):.2f} s"
        f" over {len(figures)} runs (target: within 2 s; the lease is 60 s)"
    )


if __name__ == "__main__":
    main()
