"""What one ``cflow.map`` costs: its wall time and the CPU of every process it used, per map.

    python bench/map_cpu.py [--maps 20] [--calls 2000] [--workers 2] [--one-store] [--hold GB]
                            [--captures MB] [--records] [--cache]
    python bench/map_cpu.py --other DIR [--rounds 6]      # this tree against another, alternated

Maps a no-op function over ``--calls`` integers ``--maps`` times, each into a fresh store (or
all into one with ``--one-store``), letting each map's workers go before the next, and prints
the median wall time of a map and the CPU per map of this process (user, system) and of every
process it started (the kept launcher, its workers, their task hosts: this process is made
their subreaper, so each is counted when it ends, the launcher's forking of the next map's
workers included).

``--hold GB``: the caller holds that much memory first (half bytes, half small Python
objects, all of it touched), as a notebook holding its data does.

``--captures MB``: the function mapped holds that many MB of random bytes (a model's weights,
say), shipped with it by value.

``--records``: the items are instances of a dataclass of this script's ``__main__`` (a script's
or a notebook's records), which a worker that is not a fork of the caller has no class for:
their classes go by value beside them, once a chunk.

``--cache``: every map with ``cache=True``: each into a fresh store, every map keys its function
and items and finds nothing to reuse (what the cache costs a map that misses); with
``--one-store``, every map after the first reuses every call.

``--other DIR``: a checkout of another version (``git worktree add DIR COMMIT``); the two are
measured in turn, ``--rounds`` times each, in processes of their own (this file run in each
tree), so a machine's slow spell falls on both. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, alternate, checkout, child_or_ready, in_tree, parse_args

PR_SET_CHILD_SUBREAPER = 36


def noop(i: int) -> int:
    return i


@dataclasses.dataclass(frozen=True)
class Record:  # --records: an item of a class of __main__
    n: int
    name: str = "record"


def field_n(record: Record) -> int:
    return record.n


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--maps", type=int, default=20)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one-store", action="store_true", help="every map into one store")
    parser.add_argument("--hold", type=float, default=0.0, help="GB the caller holds first")
    parser.add_argument("--captures", type=float, default=0.0, help="MB the function holds")
    parser.add_argument("--records", action="store_true", help="items of a class of __main__")
    parser.add_argument("--cache", action="store_true", help="maps with cache=True (all miss)")
    parser.add_argument("--other", type=Path, help="another version's checkout, to alternate")
    parser.add_argument("--rounds", type=int, default=6, help="with --other: rounds of each")
    parser.add_argument("--json", action="store_true", help="one line of JSON only")
    parser.add_argument(
        "--work", type=Path, default=REPO / "bench" / "out", help="where the stores go"
    )
    return parse_args(
        parser, argv, maps=2, calls=20, rounds=1, hold=0.3, captures=2, records=True, cache=True
    )


def _reap() -> None:
    """Wait for every ended process left to this one (the subreaper): its CPU is counted."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _cpu() -> list[float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    them = resource.getrusage(resource.RUSAGE_CHILDREN)
    return [me.ru_utime, me.ru_stime, them.ru_utime, them.ru_stime]


def _hold(gb: float) -> tuple[bytearray, list[str]]:
    """``gb`` GB held, all of it touched: half in one buffer, half in small strings (about
    100 bytes each, with their list)."""
    size = int(gb * (1 << 30) / 2)
    buffer = bytearray(size)
    for at in range(0, size, 4096):
        buffer[at] = 1
    return buffer, [str(i) for i in range(size // 100)]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time and CPU per map, in this process, of this tree's ``cflow``."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans (the launcher's) come to us
    import cflow
    from cflow.driver import let_go
    from runner.backends.local import kept

    held = _hold(args.hold)
    work = Path(tempfile.mkdtemp(prefix="cflow-bench-cpu-", dir=args.work))
    items: Any = range(args.calls)
    if args.records:
        items = [Record(i) for i in items]

    weights = os.urandom(int(args.captures * (1 << 20)))

    take: Any = field_n if args.records else noop

    def holding(item: Any) -> int:
        return int(take(item)) + 0 * len(weights)  # a closure over the weights: pickled with them

    fn = holding if weights else take
    expected = list(range(args.calls))

    def one(store: Path) -> float:
        start = time.perf_counter()
        values = list(
            cflow.map(
                fn, items, workers=args.workers, store=store, progress=False, cache=args.cache
            )
        )
        took = time.perf_counter() - start
        let_go()
        _reap()
        if values != expected:
            raise SystemExit("cflow.map returned wrong values")
        return took

    try:  # every store goes with its folder at the end (a run leaves about 1 MB a map)
        one(work / "warm")  # this process's first map: what it loads is loaded once
        kept.close_kept()  # the measured maps start their own launcher, counted among them
        time.sleep(0.1)
        _reap()
        before, walls = _cpu(), []
        for k in range(args.maps):
            walls.append(one(work / ("one" if args.one_store else f"s{k}")))
        kept.close_kept()  # it ends, so its own CPU is counted too
        time.sleep(0.1)
        _reap()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_map = [(b - a) * 1000 / args.maps for a, b in zip(before, _cpu(), strict=True)]
    del held
    return {
        "wall_ms": statistics.median(walls) * 1000,
        "caller_user_ms": per_map[0],
        "caller_sys_ms": per_map[1],
        "others_user_ms": per_map[2],
        "others_sys_ms": per_map[3],
        "cpu_ms": sum(per_map),
    }


def _line(tag: str, r: dict[str, Any]) -> str:
    return (
        f"{tag:8} map {r['wall_ms']:6.1f} ms   CPU per map {r['cpu_ms']:6.1f} ms (this process"
        f" {r['caller_user_ms']:.1f} user {r['caller_sys_ms']:.1f} sys; the processes it started"
        f" {r['others_user_ms']:.1f} user {r['others_sys_ms']:.1f} sys)"
    )


def _child(tree: Path, args: argparse.Namespace) -> dict[str, Any]:
    """This file run in ``tree`` (its ``cflow``), one round; what it measured."""
    argv = ["--json", "--maps", str(args.maps), "--calls", str(args.calls)]
    argv += ["--workers", str(args.workers), "--work", str(args.work)]
    if args.one_store:
        argv.append("--one-store")
    argv += ["--hold", str(args.hold), "--captures", str(args.captures)]
    if args.records:
        argv.append("--records")
    if args.cache:
        argv.append("--cache")
    measured: dict[str, Any] = in_tree(tree, str(Path(__file__).resolve()), argv)
    return measured


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if child_or_ready(args, measure):
        return
    if args.other is None:
        held = f", the caller holding {args.hold:g} GB" if args.hold else ""
        held += f", the function {args.captures:g} MB" if args.captures else ""
        held += ", items of a class of __main__" if args.records else ""
        held += ", with the cache (missing)" if args.cache else ""
        print(f"{args.maps} maps of {args.calls} no-op calls, {args.workers} workers{held}\n")
        print(_line("this", measure(args)))
        return
    other = checkout(args.other)
    print(
        f"{args.rounds} rounds of {args.maps} maps of {args.calls} no-op calls, {args.workers}"
        f" workers, the caller holding {args.hold:g} GB, the function {args.captures:g} MB:"
        f" {other} (other) and {REPO} (this), in turn\n"
    )
    rows = alternate(other, args.rounds, lambda tree: _child(tree, args), _line)
    for tag, got in rows.items():
        wall = statistics.median(r["wall_ms"] for r in got)
        cpu = statistics.median(r["cpu_ms"] for r in got)
        print(f"{tag:8} median of the rounds: map {wall:6.1f} ms, CPU per map {cpu:6.1f} ms")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
