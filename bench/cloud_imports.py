"""What a cloud command pays to load Google's client libraries, before it makes a call.

    python bench/cloud_imports.py [--rounds 7] [--quick]

Each round starts fresh interpreters, in turn, that load: Compute Engine's package as a plain
``from google.cloud import compute_v1`` and then the runner's eleven clients from it; the same
eleven through :mod:`runner.backends.gcp.compute` (only their services loaded); Pub/Sub's and
Cloud Storage's clients; and nothing (the interpreter's own start). Prints the median CPU
seconds (user + system) of each, side by side, from the same rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys

from _common import REPO, compile_project, parse_args

CLIENTS = [
    "InstanceGroupManagersClient",
    "RegionInstanceGroupManagersClient",
    "ZoneOperationsClient",
    "RegionOperationsClient",
    "GlobalOperationsClient",
    "InstanceTemplatesClient",
    "ImagesClient",
    "MachineTypesClient",
    "AcceleratorTypesClient",
    "RegionsClient",
    "ProjectsClient",
]
LOAD = f"[getattr(compute_v1, n) for n in {CLIENTS!r}]"
CASES = {
    "compute_v1, plain import": f"from google.cloud import compute_v1; {LOAD}",
    "compute_v1, the runner's services only": (
        f"from runner.backends.gcp.compute import compute_v1; {LOAD}"
    ),
    "pubsub_v1 + storage (for scale)": "from google.cloud import pubsub_v1, storage",
    "python itself": "pass",
}


def cpu_seconds(code: str) -> float:
    """CPU seconds of a fresh interpreter running ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parse_args(parser, argv, rounds=1)
    compile_project()
    figures: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, code in CASES.items():
            figures[name].append(cpu_seconds(code))
    print(f"CPU seconds to load, median of {args.rounds} rounds:")
    for name, values in figures.items():
        print(f"  {name:<40} {statistics.median(values):6.2f} s")


if __name__ == "__main__":
    main()
