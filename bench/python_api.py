"""``cflow.map`` from a running Python process against the Python peers, side by side.

    python bench/python_api.py [--calls 2000] [--workers 2] [--runs 3] [--quick]

Every contender maps the same no-op function over ``--calls`` integers with ``--workers``
processes and gets the values back in input order, inside this process:

- ``cflow.map`` on the local backend: a fresh store, the function shipped by value, the
  calls in chunk shards of up to 250 (the size it chooses), every chunk's values committed
  durably before it is acked, and read back from the store; the same into one store that
  every round maps into again (as a script's maps go into ``./.cflow``); and the same with
  ``chunk_size=1``, a shard per call;
- ``multiprocessing.Pool.map`` and ``concurrent.futures.ProcessPoolExecutor.map`` (nothing
  durable);
- Dask on a ``LocalCluster`` of as many single-threaded worker processes, and Ray with as many
  CPUs (nothing durable); each is skipped, with a line saying so, where it is not installed.

Each is timed as its start-up (a pool's or cluster's) and its map; the total is the two,
shutting down is not counted (for ``cflow.map``: its workers let go, once its run is recorded
finished and the values are back; ``bench/map_cpu.py`` counts the CPU of all of it).
``cflow.map`` starts its workers inside the call the first time;
it keeps the launcher that forks them from one map to the next, and once a map has let its
workers go, the launcher forks the next map's workers ahead: that time is counted in the
``start`` of the round whose map let them go, so every round's total is a map plus one
readying of workers (the last round's readies workers no map uses: counted all the same).
Rounds run every contender once (this machine is noisy), each round's order turned by one place
so that no contender always follows the same one; medians are printed with every round's.

Then, in an interpreter of its own with another thread running (as a notebook's kernel has),
``--runs`` + 1 maps one after another: the first spawns its workers, the next are forked by
the launcher the first started once it let its workers go; the later maps' median is printed
with every map's time.

Then the cached rerun, once per round: the same map with ``cache=True`` into a store where an
earlier run committed every call, timed from the call to its values (goal: under 0.5 s for
2,000); the median and every round's.

Goals: ``cflow.map`` under 5x Pool and ahead of Dask and Ray. Prints a table and one JSON line;
nothing is asserted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from _common import REPO, compile_project, parse_args

import cflow
from cflow.driver import let_go
from runner.backends.local.kept import kept
from runner.backends.local.launcher import FORK_ENV, can_fork
from runner.submit import SubmitRequest

MapFn = Callable[[Callable[[int], int], range], list[Any]]
Starter = Callable[[int, Path], AbstractContextManager[MapFn]]  # (workers, work) -> a map


def noop(i: int) -> int:
    return i


FORKED: list[bool] = []  # per cflow.map: whether its workers could be forked from this process


@contextmanager
def _cflow(workers: int, work: Path) -> Iterator[MapFn]:
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    # Forked by a launcher kept from an earlier map, or by one started now (forked from this
    # process, or a new interpreter where a peer left threads running); spawned only where
    # there is no launcher at all.
    FORKED.append(kept() is not None or can_fork() or os.environ.get(FORK_ENV, "1") != "0")
    yield lambda fn, items: list(cflow.map(fn, items, workers=workers, store=store, progress=False))
    let_go()  # its workers stop after the values are back: not counted, not in the next one


@contextmanager
def _cflow_one_store(workers: int, work: Path) -> Iterator[MapFn]:
    store = work / "one-store"  # the same every round, as ./.cflow is for a script's maps
    yield lambda fn, items: list(cflow.map(fn, items, workers=workers, store=store, progress=False))
    let_go()


@contextmanager
def _cflow_plain(workers: int, work: Path) -> Iterator[MapFn]:
    store = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    yield lambda fn, items: list(
        cflow.map(fn, items, workers=workers, store=store, progress=False, chunk_size=1)
    )
    let_go()


@contextmanager
def _pool(workers: int, work: Path) -> Iterator[MapFn]:
    with multiprocessing.Pool(workers) as pool:
        yield lambda fn, items: pool.map(fn, items)


@contextmanager
def _executor(workers: int, work: Path) -> Iterator[MapFn]:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        yield lambda fn, items: list(pool.map(fn, items))


@contextmanager
def _dask(workers: int, work: Path) -> Iterator[MapFn]:
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        local_directory=str(work),
    )
    client = Client(cluster)
    try:
        yield lambda fn, items: client.gather(client.map(fn, items, pure=False))
    finally:
        client.close()
        cluster.close()


@contextmanager
def _ray(workers: int, work: Path) -> Iterator[MapFn]:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        remote = ray.remote(noop)
        yield lambda fn, items: ray.get([remote.remote(i) for i in items])
    finally:
        ray.shutdown()


@dataclasses.dataclass
class Timing:
    start: list[float] = dataclasses.field(default_factory=list)
    map: list[float] = dataclasses.field(default_factory=list)

    @property
    def total(self) -> list[float]:
        return [s + m for s, m in zip(self.start, self.map, strict=True)]


def _contenders() -> dict[str, Starter]:
    """Every contender installed here; each missing one is said and left out."""
    found: dict[str, Starter] = {
        "cflow.map": _cflow,
        "cflow.map, one store": _cflow_one_store,
        "cflow.map, chunk_size=1": _cflow_plain,
        "multiprocessing.Pool": _pool,
        "ProcessPoolExecutor": _executor,
    }
    for name, module, starter, package in (
        ("Dask LocalCluster", "distributed", _dask, "dask[distributed]"),
        ("Ray", "ray", _ray, "ray"),
    ):
        if importlib.util.find_spec(module) is None:
            print(f"{name}: not installed (pip install '{package}'): skipped", file=sys.stderr)
        else:
            found[name] = starter
    return found


def _ahead_seconds() -> float:
    launcher = kept()
    return launcher.ahead_seconds if launcher is not None else 0.0


def _round(contenders: dict[str, Starter], times: dict[str, Timing], args: Any, turn: int) -> None:
    """Every contender once, in an order turned by ``turn`` places each round: none always
    comes right after the same one (Ray's and Dask's processes are still exiting for a while
    after their shutdown, and whoever follows them shares the machine with that)."""
    items = range(args.calls)
    order = list(contenders.items())
    order = order[turn % len(order) :] + order[: turn % len(order)]
    for name, starter in order:
        ahead = _ahead_seconds()
        t0 = time.perf_counter()
        with starter(args.workers, args.work_dir) as mapped:
            t1 = time.perf_counter()
            values = mapped(noop, items)
            t2 = time.perf_counter()
        if list(values) != list(items):
            raise SystemExit(f"{name} returned wrong values")
        # cflow.map's start: what its kept launcher spent, once the map had let its workers
        # go, forking the next map's workers ahead (no map counts it otherwise).
        readied = _ahead_seconds() - ahead if name.startswith("cflow") else 0.0
        times.setdefault(name, Timing()).start.append(t1 - t0 + max(readied, 0.0))
        times[name].map.append(t2 - t1)


# A caller with another thread running, as a notebook's kernel has, in an interpreter of its
# own (a launcher is kept per process): its maps' seconds, one a line of JSON at the end.
_THREADED = """
import json, sys, tempfile, threading, time
from pathlib import Path
import cflow
from cflow.driver import let_go
calls, workers, maps, work = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
release = threading.Event()
other = threading.Thread(target=release.wait)
other.start()
took = []
for k in range(maps):
    store = Path(tempfile.mkdtemp(prefix="threaded-", dir=work))
    start = time.perf_counter()
    values = cflow.map(abs, range(calls), workers=workers, store=store, progress=False)
    took.append(time.perf_counter() - start)
    assert list(values) == list(range(calls))
    let_go()
release.set()
other.join()
print(json.dumps(took))
"""


def _threaded_caller(args: Any) -> list[float]:
    """Seconds of each of ``--runs`` + 1 maps from a fresh interpreter with another thread
    running: the first spawns its workers, the next are forked by the launcher it started
    as a new interpreter once the first let its workers go."""
    done = subprocess.run(
        [sys.executable, "-c", _THREADED, str(args.calls), str(args.workers),
         str(args.runs + 1), str(args.work_dir)],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    took: list[float] = json.loads(done.stdout.splitlines()[-1])
    return took


def _cached_rerun(args: Any) -> dict[str, Any]:
    """Seconds of a ``cache=True`` rerun whose every call an earlier run committed (None: the
    cache is not in this version)."""
    if "cache" not in {f.name for f in dataclasses.fields(SubmitRequest)}:
        print("cached rerun: cache=True is not in this version: skipped", file=sys.stderr)
        return {"seconds": None, "cached": 0}
    store = Path(tempfile.mkdtemp(prefix="cached-", dir=args.work_dir))
    options: dict[str, Any] = {"workers": args.workers, "store": store, "progress": False}
    cflow.map(noop, range(args.calls), cache=True, **options)
    let_go()
    took, cached = [], 0
    for _ in range(args.runs):  # each rerun reuses the run before it
        start = time.perf_counter()
        run = cflow.submit(noop, range(args.calls), cache=True, **options)
        values = list(run.results())
        took.append(time.perf_counter() - start)
        let_go()
        if values != list(range(args.calls)):
            raise SystemExit("the cached rerun returned wrong values")
        cached = run.progress().cached
    return {
        "seconds": statistics.median(took),
        "rounds": [round(t, 3) for t in took],
        "cached": cached,
    }


def _table(times: dict[str, Timing], calls: int) -> list[dict[str, Any]]:
    med = statistics.median
    pool = med(times["multiprocessing.Pool"].total)
    pool_map = med(times["multiprocessing.Pool"].map)
    rows = []
    for name, t in times.items():
        total = med(t.total)
        rows.append(
            {
                "what": name,
                "start": med(t.start),
                "map": med(t.map),
                "total": total,
                "calls_per_s": calls / total,
                "x_pool": total / pool,
                "x_pool_map": med(t.map) / pool_map,
                "rounds": [round(v, 3) for v in t.total],
            }
        )
    return rows


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3, help="rounds of every contender")
    parser.add_argument(
        "--only",
        help="comma-separated contenders to run (say 'cflow.map,multiprocessing.Pool': Dask and"
        " Ray leave threads running, after which cflow.map cannot fork its workers)",
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / "bench" / "out", help="where the stores go"
    )
    return parse_args(parser, argv, calls=20, runs=1)


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    compile_project()
    args.work.mkdir(parents=True, exist_ok=True)
    times: dict[str, Timing] = {}
    contenders = _contenders()
    if args.only:
        # Names hold ", " themselves ("cflow.map, one store"): split at commas without a space.
        wanted = {name.strip() for name in re.split(r",(?! )", args.only)}
        wanted |= {"cflow.map", "multiprocessing.Pool"}  # the figures are against these
        contenders = {name: c for name, c in contenders.items() if name in wanted}
    with tempfile.TemporaryDirectory(prefix="cflow-bench-api-", dir=args.work) as tmp:
        args.work_dir = Path(tmp)
        for turn in range(args.runs):
            _round(contenders, times, args, turn)
        cached = _cached_rerun(args)
        threaded = _threaded_caller(args)
    rows = _table(times, args.calls)
    print(
        f"{args.calls} no-op calls, {args.workers} worker processes, {args.runs} rounds"
        " (medians; seconds)\n"
    )
    print(
        f"{'what':24} {'start':>6} {'map':>6} {'total':>6} {'calls/s':>8} {'x Pool':>7}"
        f" {'x Pool map':>10}   totals"
    )
    for r in rows:
        print(
            f"{r['what']:24} {r['start']:6.2f} {r['map']:6.2f} {r['total']:6.2f}"
            f" {r['calls_per_s']:8.0f} {r['x_pool']:7.1f} {r['x_pool_map']:10.1f}   "
            + " ".join(f"{v:.2f}" for v in r["rounds"])
        )
    if cached["seconds"] is not None:
        print(
            f"{'cflow.map, cached':24} {'':6} {cached['seconds']:6.2f} {cached['seconds']:6.2f}"
            f" {args.calls / cached['seconds']:8.0f}   ({cached['cached']} of {args.calls}"
            " calls reused; goal: under 0.5 s at 2,000) "
            + " ".join(f"{v:.2f}" for v in cached["rounds"])
        )
    later = statistics.median(threaded[1:]) if len(threaded) > 1 else float("nan")
    print(
        f"{'cflow.map, threaded':24} {'':6} {later:6.2f} {later:6.2f}   (a caller with another"
        f" thread, as a notebook's kernel: its first map {threaded[0]:.2f} s with spawned workers,"
        " the next forked by the launcher it then started) "
        + " ".join(f"{v:.2f}" for v in threaded)
    )
    forked = sum(FORKED)
    print(
        f"\ncflow.map's workers forked in {forked} of {len(FORKED)} rounds (by the launcher kept"
        " from the first map: forked from this process while it had one thread, else started"
        " as a new interpreter; workers are spawned only with CFLOW_FORK_WORKERS=0)"
    )
    by_name = {r["what"]: r for r in rows}
    ours = by_name["cflow.map"]
    print(f"\ncflow.map: {ours['x_pool']:.1f}x Pool in total (goal: under 5x)")
    for peer in ("Dask LocalCluster", "Ray"):
        if peer in by_name:
            ahead = "ahead of" if ours["total"] < by_name[peer]["total"] else "behind"
            print(
                f"cflow.map is {ahead} {peer}: {ours['total']:.2f} s against"
                f" {by_name[peer]['total']:.2f} s in total, {by_name[peer]['map']:.2f} s for"
                " its map alone on a started cluster"
            )
    print(
        json.dumps(
            {
                "calls": args.calls,
                "workers": args.workers,
                "rows": rows,
                "cached": cached,
                "threaded": threaded,
            }
        )
    )


if __name__ == "__main__":
    main()
