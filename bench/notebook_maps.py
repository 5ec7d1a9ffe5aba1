"""Maps as a notebook makes them: numpy imported (its OpenBLAS starts a thread, as a Jupyter
kernel has threads), a function using numpy, a pause between maps (a person reading a cell's
output before running the next).

    python bench/notebook_maps.py [--maps 8] [--calls 200] [--pause 0.5] [--workers 2]
    python bench/notebook_maps.py --other DIR [--rounds 3]    # this tree against another

Such a caller may not fork: its first map's workers are new interpreters, and the launcher it
keeps for the next maps is one too, holding none of the caller's modules. Prints each map's
seconds and the median of the maps after the first. ``--other DIR``: a checkout of another
version (``git worktree add DIR COMMIT``), measured in turn with this one, ``--rounds`` times
each, each in a process of its own (this file run in each tree). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (
    REPO,
    alternate,
    cannot_run,
    checkout,
    child_or_ready,
    in_tree,
    parse_args,
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--maps", type=int, default=8)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between maps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--other", type=Path, help="another version's checkout, to alternate")
    parser.add_argument("--rounds", type=int, default=3, help="with --other: rounds of each")
    parser.add_argument("--json", action="store_true", help="one line of JSON only")
    parser.add_argument(
        "--work", type=Path, default=REPO / "bench" / "out", help="where the stores go"
    )
    return parse_args(parser, argv, maps=2, calls=10, pause=0.1, rounds=1)


def measure(args: argparse.Namespace) -> list[float]:
    """Seconds of each map, in this process, of this tree's ``cflow``."""
    try:
        import numpy as np
    except ImportError:
        cannot_run("numpy is not installed (pip install numpy)")
    import cflow
    from cflow.driver import let_go

    release = threading.Event()  # a kernel's threads, whatever numpy's BLAS does
    other = threading.Thread(target=release.wait)
    other.start()

    def root(x: int) -> float:
        return float(np.sqrt(x))

    store = Path(tempfile.mkdtemp(prefix="cflow-bench-nb-", dir=args.work))
    items, took = range(args.calls), []
    try:
        for _ in range(args.maps):
            start = time.perf_counter()
            values = list(cflow.map(root, items, workers=args.workers, store=store, progress=False))
            took.append(time.perf_counter() - start)
            if values != [float(np.sqrt(x)) for x in items]:
                raise SystemExit("cflow.map returned wrong values")
            let_go()
            time.sleep(args.pause)
    finally:
        release.set()
        other.join()
        shutil.rmtree(store, ignore_errors=True)
    return took


def _child(tree: Path, args: argparse.Namespace) -> list[float]:
    """This file run in ``tree`` (its ``cflow``), one round; each map's seconds."""
    argv = ["--json", "--maps", str(args.maps), "--calls", str(args.calls)]
    argv += ["--pause", str(args.pause), "--workers", str(args.workers), "--work", str(args.work)]
    took: list[float] = in_tree(tree, str(Path(__file__).resolve()), argv)
    return took


def _line(tag: str, took: list[float]) -> str:
    later = statistics.median(took[1:]) if len(took) > 1 else float("nan")
    maps = " ".join(f"{t * 1000:.0f}" for t in took)
    return f"{tag:6} later maps' median {later * 1000:6.1f} ms   each map, ms: {maps}"


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if child_or_ready(args, measure):
        return
    print(
        f"{args.maps} maps of {args.calls} calls of a function using numpy, {args.workers}"
        f" workers, {args.pause:g} s between maps, from a caller with another thread\n"
    )
    if args.other is None:
        print(_line("this", measure(args)))
        return
    rows = alternate(checkout(args.other), args.rounds, lambda tree: _child(tree, args), _line)
    for tag, got in rows.items():
        later = statistics.median(t for took in got for t in took[1:])
        print(f"{tag:6} median of the later maps of every round: {later * 1000:6.1f} ms")
    summary: dict[str, Any] = {tag: got for tag, got in rows.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
