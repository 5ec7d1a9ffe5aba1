"""Run by test_interplay.py in a process of its own: ``cflow.map`` over items that wait for a
gate file, interrupted by SIGINT (Ctrl-C) once the first has started (modes ``cancel`` and
``detach``); or ``cflow.submit`` of them, the script ending without waiting (``exit``,
``exit-detach``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cflow


def main() -> None:
    store, marks, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    detach = mode.endswith("detach")

    def gated(x: int) -> int:
        (marks / f"started-{x}").touch()
        while not (marks / "go").exists():
            time.sleep(0.05)
        return x * 10

    if mode.startswith("exit"):
        cflow.submit(gated, range(3), store=store, workers=1, detach=detach)
        return
    try:
        cflow.map(gated, range(3), store=store, workers=1, detach=detach)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
