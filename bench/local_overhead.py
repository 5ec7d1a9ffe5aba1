"""The local backend's overhead per shard against peers doing the same work at parallelism 2.

    python bench/local_overhead.py [--shards 2000] [--small 200] [--runs 5] [--quick]

Every figure is the wall-clock time of a whole command or program, start-up included, with
peers measured side by side in the same run (round-robin, ``--runs`` rounds), because this
machine is noisy; medians are printed with every run's figure.

1. A no-op Python ``run(shard)``: ``runner submit`` (2 workers; every result committed durably,
   with an fsync, before its message is acked) against ``multiprocessing.Pool(2)`` (nothing
   durable) and huey with its SQLite storage and a 2-process consumer (durable, like CFlow).
   Targets: 2,000 shards in at most 1.0 s and ahead of huey; at most 0.5 ms per extra shard
   (the slope between ``--small`` and ``--shards``); a fixed cost of at most 0.5 s (start of
   the command to the first shard, plus the last shard to the command's exit, read from the
   run's own events).
2. A no-op ``task.sh``: ``runner submit`` against GNU parallel -j2 and ``xargs -P2`` running
   the same script. Target: at most 1.0x GNU parallel in every run.

Beside each ``runner submit``'s wall time, the CPU seconds (user and system) of every process
it started: the runner, its workers and their task hosts (this benchmark is their subreaper, so
workers that outlive the runner are counted too). On a loaded machine the wall times follow the
load; the CPU seconds move far less, so two checkouts measured in one sitting compare by them.

The store lives under ``--work`` (default ``bench/out/`` in the checkout, where a user's
``./.cflow`` would be). Prints tables and one JSON line; nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from _common import REPO, compile_project, parse_args

# The same busy timeout as CFlow's queue.db (worker.backends.local.db.BUSY_TIMEOUT): huey's
# default of 5 s ends the whole benchmark with "database is locked" on a loaded machine.
HUEY_TASKS = """
from huey import SqliteHuey

huey = SqliteHuey(filename={db!r}, timeout=30)

@huey.task()
def noop(i):
    return i
"""


PR_SET_CHILD_SUBREAPER = 36  # prctl(2)


def _become_subreaper() -> bool:
    """Make the processes a run leaves behind (its workers, once the runner exits) children of
    this one, so their CPU time is counted when they are reaped. Linux only."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _children_cpu() -> float:
    """CPU seconds (user and system) of every child process reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _reap(*, wait: bool) -> None:
    """Reap the children that have ended; with ``wait``, wait for every one left (a run's
    workers stop on their own once it has ended)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cflow(task: Path, shards: int, work: Path) -> dict[str, float]:
    """One ``runner submit``: its wall time, the CPU time of every process it started, and,
    from the run's events, its fixed cost."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    env = {**os.environ, "CFLOW_STORE": str(store), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "runner", "submit", str(task), "--shards", str(shards)]
    _reap(wait=False)  # what an earlier contender left is not this run's
    cpu_before = _children_cpu()
    start_epoch = time.time()
    start = time.perf_counter()
    proc = subprocess.run(
        [*argv, "--workers", "2"], cwd=work, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    end_epoch = start_epoch + wall
    if proc.returncode != 0:
        raise SystemExit(f"runner submit failed:\n{proc.stderr[-2000:]}")
    _reap(wait=True)
    cpu = _children_cpu() - cpu_before
    run_id = proc.stdout.strip().splitlines()[0]
    conn = sqlite3.connect(store / "queue.db")
    try:
        committed = conn.execute(
            "SELECT COUNT(*) FROM records WHERE key GLOB ?",
            (f"runs/{run_id}/shards/*/result.json",),
        ).fetchone()[0]
        first, last = conn.execute(
            'SELECT MIN(at), MAX(at) FROM events WHERE run_id = ? AND body LIKE \'%"kind":"s%\'',
            (run_id,),
        ).fetchone()
    finally:
        conn.close()
    if committed != shards:
        raise SystemExit(f"only {committed} of {shards} shards committed")
    return {"wall": wall, "cpu": cpu, "fixed": (first - start_epoch) + (end_epoch - last)}


def _noop(i: int) -> int:
    return i


def _pool(shards: int) -> None:
    with multiprocessing.Pool(2) as pool:
        pool.map(_noop, range(shards), chunksize=1)


def _huey(shards: int, work: Path) -> None:
    """Enqueue every task, start a 2-process consumer, wait for every result, stop it."""
    folder = Path(tempfile.mkdtemp(prefix="huey-", dir=work))
    db = folder / "huey.db"
    (folder / "hueytasks.py").write_text(textwrap.dedent(HUEY_TASKS.format(db=str(db))))
    code = textwrap.dedent(
        f"""
        import subprocess, sys, time
        sys.path.insert(0, {str(folder)!r})
        from hueytasks import huey, noop
        results = [noop(i) for i in range({shards})]
        consumer = subprocess.Popen(
            [sys.executable, "-m", "huey.bin.huey_consumer", "hueytasks.huey",
             "-w", "2", "-k", "process", "-q"],
            cwd={str(folder)!r},
        )
        try:
            for r in results:
                r.get(blocking=True, timeout=120)
        finally:
            consumer.terminate()
            consumer.wait()
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=folder)
    shutil.rmtree(folder, ignore_errors=True)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--small", type=int, default=200, help="the short run for the slope")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-shell", action="store_true")
    parser.add_argument(
        "--work",
        type=Path,
        default=REPO / "bench" / "out",
        help="where the store goes (default: inside the checkout, as ./.cflow would be)",
    )
    return parse_args(parser, argv, shards=20, small=10, runs=1)


def _peers() -> tuple[bool, bool]:
    """Whether huey and GNU parallel are here; each missing one is said and left out."""
    try:
        import huey  # noqa: F401
    except ImportError:
        have_huey = False
        print("huey not installed (pip install huey): skipped", file=sys.stderr)
    else:
        have_huey = True
    have_parallel = shutil.which("parallel") is not None
    if not have_parallel:
        print("GNU parallel not found (apt-get install parallel): skipped", file=sys.stderr)
    return have_huey, have_parallel


Contender = Callable[[], dict[str, float]]


def _contenders(work: Path, args: argparse.Namespace) -> dict[str, Contender]:
    """Each contender of a round: what it runs, returning its figures by name."""
    n, small = args.shards, args.small
    py_task = work / "py-task"
    py_task.mkdir()
    (py_task / "task.py").write_text("def run(shard):\n    pass\n")
    sh_task = work / "sh-task"
    sh_task.mkdir()
    (sh_task / "task.sh").write_text("#!/usr/bin/env bash\ntrue\n")
    (sh_task / "task.sh").chmod(0o755)
    script = str(sh_task / "task.sh")
    have_huey, have_parallel = _peers()

    def cflow() -> dict[str, float]:
        big = _cflow(py_task, n, work)
        return {"py/cflow": big["wall"], "py/cflow fixed": big["fixed"], "py/cflow cpu": big["cpu"]}

    def cflow_small() -> dict[str, float]:
        figures = _cflow(py_task, small, work)
        return {"py/cflow small": figures["wall"], "py/cflow small cpu": figures["cpu"]}

    def run(argv: list[str], stdin: str | None = None) -> float:
        return _timed(
            lambda: subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)
        )

    out: dict[str, Contender] = {
        "py/cflow": cflow,
        "py/cflow small": cflow_small,
        "py/Pool": lambda: {"py/Pool": _timed(lambda: _pool(n))},
    }
    if have_huey:
        out["py/huey"] = lambda: {"py/huey": _timed(lambda: _huey(n, work))}
    if args.skip_shell:
        return out
    out["sh/cflow"] = lambda: {"sh/cflow": _cflow(sh_task, n, work)["wall"]}
    if have_parallel:
        argv = ["parallel", "-j2", script, ":::", *map(str, range(n))]
        out["sh/parallel"] = lambda: {"sh/parallel": run(argv)}
    seq = "".join(f"{i}\n" for i in range(n))
    out["sh/xargs"] = lambda: {"sh/xargs": run(["xargs", "-P2", "-n1", script], seq)}
    return out


def _figures(times: dict[str, list[float]], n: int, small: int) -> dict[str, object]:
    """The figures against the targets, from every round's times."""
    cflow = times["py/cflow"]
    slope = [
        (b - s) / (n - small) * 1000 for b, s in zip(cflow, times["py/cflow small"], strict=True)
    ]
    cpu = times["py/cflow cpu"]
    cpu_slope = [
        (b - s) / (n - small) * 1000 for b, s in zip(cpu, times["py/cflow small cpu"], strict=True)
    ]
    figures: dict[str, object] = {
        f"python: {n:,} shards, s (target <= 1.0 at 2,000)": round(_median(cflow), 3),
        "python: ms per extra shard (target <= 0.5)": round(_median(slope), 3),
        "python: fixed cost, s (target <= 0.5)": round(_median(times["py/cflow fixed"]), 3),
        f"python: CPU s of every process, {n:,} shards": round(_median(cpu), 3),
        "python: CPU ms per extra shard": round(_median(cpu_slope), 3),
        "python: cflow / Pool": round(_median(cflow) / _median(times["py/Pool"]), 2),
    }
    if "py/huey" in times:
        figures["python: cflow / huey (target < 1)"] = round(
            _median(cflow) / _median(times["py/huey"]), 2
        )
    if "sh/parallel" in times:
        ratios = [c / p for c, p in zip(times["sh/cflow"], times["sh/parallel"], strict=True)]
        figures["shell: cflow / GNU parallel, every run (target <= 1.0)"] = [
            round(r, 2) for r in ratios
        ]
    if "sh/xargs" in times:
        figures["shell: cflow / xargs, median"] = round(
            _median(times["sh/cflow"]) / _median(times["sh/xargs"]), 2
        )
    return figures


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if not _become_subreaper():
        print("not Linux: CPU figures leave out workers that outlive the runner", file=sys.stderr)
    compile_project()
    args.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="cflow-bench-", dir=args.work) as tmp:
        contenders = _contenders(Path(tmp), args)
        for _ in range(args.runs):  # round-robin: each round runs every contender once
            for contender in contenders.values():
                for name, value in contender().items():
                    times.setdefault(name, []).append(value)
    n = args.shards
    print(f"{n} no-op shards, parallelism 2, {args.runs} rounds (seconds, whole process)\n")
    print(f"{'what':22} {'median':>7}   runs")
    for name, values in times.items():
        print(f"{name:22} {_median(values):7.2f}   {_fmt(values)}")
    figures = _figures(times, n, args.small)
    print()
    for name, figure in figures.items():
        print(f"{name:58} {figure}")
    print(json.dumps({"shards": n, "runs": times, "figures": figures}))


if __name__ == "__main__":
    main()
