"""Run by test_stream.py in a process of its own: a generator of 100,000 items through
``cflow.submit``; prints the peak RSS growth while they were published, as JSON."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cflow

COUNT = 100_000
WAIT_SECONDS = 60.0  # how long the last item waits for a first commit before giving up


RUNS: list[cflow.Run] = []  # the run, once submit returned


def committed_any() -> bool:
    return bool(RUNS) and RUNS[0].progress().succeeded > 0


def items() -> Iterator[bytes]:
    for i in range(COUNT):
        if i == COUNT - 1:  # the run must have started before the iterable ends
            deadline = time.monotonic() + WAIT_SECONDS
            while not committed_any():
                if time.monotonic() > deadline:
                    raise RuntimeError("no item committed before the iterable ended")
                time.sleep(0.05)
        yield i.to_bytes(4, "big") * 64  # 256 bytes: ~30 MB in all, more as objects


def main() -> None:
    store = Path(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    run = cflow.submit(len, items(), store=store, workers=1)
    RUNS.append(run)
    while run.progress().publishing:
        time.sleep(0.1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    total = run.progress().total
    run.cancel()
    print(json.dumps({"peak_kib": peak, "total": total, "run": run.id}))


if __name__ == "__main__":
    main()
