"""Run by test_interplay.py in a process of its own: ``cflow.map`` over items that wait for a
gate file, interrupted by SIGINT (Ctrl-C) once the first has started (modes ``cancel`` and
``detach``; ``detach-stream``: of an endless stream of items); or ``cflow.submit`` of them,
the script ending without waiting (``exit``, ``exit-detach``; ``exit-detach-many``: more
items than one publish batch)."""

from __future__ import annotations

import itertools
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cflow


def main() -> None:
    store, marks, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    detach = "detach" in mode

    def gated(x: int) -> int:
        (marks / f"started-{x}").touch()
        while not (marks / "go").exists():
            time.sleep(0.05)
        return x * 10

    def slowly() -> Iterator[int]:  # an endless stream, read as it goes
        for x in itertools.count():
            time.sleep(0.05)
            yield x

    if mode == "stalls":  # two batches of items, then a stream that waits for ever

        def stalling() -> Iterator[int]:
            for x in range(20):
                if x % 10 == 0:
                    time.sleep(0.5)  # each ten a publish batch of its own
                yield x
            (marks / "read").touch()
            time.sleep(600)
            yield 20

        run = cflow.submit(lambda x: x * 10, stalling(), store=store, chunk_size=1)
        print(run.id, flush=True)
        run.results()
        return
    if mode == "exit-detach-many":  # more items than one publish batch, left at once
        cflow.submit(lambda x: x * 10, range(2500), store=store, detach=True, chunk_size=1)
        return
    if mode.startswith("exit"):
        cflow.submit(gated, range(3), store=store, workers=1, detach=detach)
        return
    items = slowly() if mode == "detach-stream" else range(3)
    try:
        cflow.map(gated, items, store=store, workers=1, detach=detach)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
