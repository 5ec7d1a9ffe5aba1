"""Whether a map gets slower as its store ages: ``cflow.map`` after ``cflow.map`` into one store.

    python bench/store_age.py [--maps 600] [--calls 200] [--workers 2] [--blocks 6] [--quick]

A script's or a notebook's maps all go into one store (``./.cflow``), which keeps what every
run left: its records, every worker's log and lifetime record, the last hour's events. This
maps a no-op function over ``--calls`` integers ``--maps`` times into one fresh store, back to
back, and prints the median map time of each block of maps in order, the last block's against
the first's, and what the store holds at the end. A map that costs the same in an old store as
in a new one has its last block at about 1.0x its first; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from _common import REPO, compile_project, parse_args

import cflow
from cflow.driver import let_go


def noop(i: int) -> int:
    return i


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--maps", type=int, default=600)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6, help="blocks of maps to report")
    parser.add_argument(
        "--work", type=Path, default=REPO / "bench" / "out", help="where the store goes"
    )
    return parse_args(parser, argv, maps=12, calls=20, blocks=3)


def _holds(store: Path) -> dict[str, int]:
    """What the store keeps at the end: runs, workers' logs, events, records."""
    conn = sqlite3.connect(store / "queue.db")
    try:
        events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        records = conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    finally:
        conn.close()
    return {
        "runs": sum(1 for _ in (store / "runs").iterdir()),
        "worker_logs": sum(1 for _ in (store / "fleet" / "logs").glob("*.log")),
        "events": events,
        "records": records,
    }


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.maps < args.blocks:
        raise SystemExit(f"--maps {args.maps} makes no {args.blocks} blocks; give more maps")
    compile_project()
    args.work.mkdir(parents=True, exist_ok=True)
    items = range(args.calls)
    took: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cflow-bench-age-", dir=args.work) as tmp:
        store = Path(tmp) / "store"
        for _ in range(args.maps):
            start = time.perf_counter()
            values = list(cflow.map(noop, items, workers=args.workers, store=store, progress=False))
            took.append(time.perf_counter() - start)
            let_go()  # its workers stop before the next map, as between a script's maps
            if values != list(items):
                raise SystemExit("cflow.map returned wrong values")
        holds = _holds(store)
    size = len(took) // args.blocks
    blocks = [took[b * size : (b + 1) * size] for b in range(args.blocks)]
    medians = [statistics.median(b) for b in blocks]
    print(
        f"{args.maps} maps of {args.calls} no-op calls into one store, {args.workers} workers"
        f" (median map time per block of {size} maps; ms)\n"
    )
    for b, median in enumerate(medians):
        print(f"maps {b * size + 1:5d} to {(b + 1) * size:5d}: {median * 1000:7.1f}")
    ratio = medians[-1] / medians[0]
    print(f"\nthe last block against the first: {ratio:.2f}x")
    print(
        f"the store at the end: {holds['runs']} runs, {holds['worker_logs']} workers' logs,"
        f" {holds['events']} events, {holds['records']} records"
    )
    print(
        json.dumps(
            {
                "maps": args.maps,
                "calls": args.calls,
                "workers": args.workers,
                "block_ms": [round(m * 1000, 2) for m in medians],
                "last_over_first": round(ratio, 3),
                "store": holds,
            }
        )
    )


if __name__ == "__main__":
    main()
