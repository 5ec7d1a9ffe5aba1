"""Run by test_preload.py in a process of its own, with another thread running (as a notebook's
kernel, or a process that imported numpy, has): its launcher is a new interpreter, holding none
of its modules. Maps a function using numpy, lets its workers go, then prints as JSON, for each
task host forked ahead for the next map, whether numpy's compiled parts are loaded in it; then
maps again and prints the values."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

import cflow
from cflow.driver import let_go
from runner.backends.local.kept import kept
from worker.executors import reaper

WAIT_SECONDS = 30.0  # how long a spare host may take to import numpy


def root(x: int) -> float:
    return float(np.sqrt(x))


def loaded(pid: int) -> bool:
    return "numpy" in Path(f"/proc/{pid}/maps").read_text()


def main(store: Path) -> None:
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        first = list(cflow.map(root, [4, 9], store=store, workers=2, progress=False))
        let_go()
        launcher = kept()
        assert launcher is not None, "no launcher was kept"
        hosts = [h for w in reaper.children(launcher.pid) for h in reaper.children(w)]
        deadline = time.monotonic() + WAIT_SECONDS
        while not all(map(loaded, hosts)) and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = {str(h): loaded(h) for h in hosts}
        again = list(cflow.map(root, [16, 25], store=store, workers=2, progress=False))
        let_go()
    finally:
        release.set()
        other.join()
    print(json.dumps({"first": first, "hosts": ready, "again": again}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
