"""What every benchmark shares: its quick form, and how it says it cannot run on this machine.

A module of ``bench/`` whose name starts with ``_`` is code the benchmarks share, not a benchmark.

- ``--quick``: every benchmark takes it and then runs the same code paths at a tiny size, in a
  few seconds, printing the same figures (meaningless at that size: the quick form is there so a
  benchmark that no longer runs is noticed; ``tests/bench/`` runs every quick form).
- Exit status :data:`CANNOT_RUN` (77, as automake's test drivers read it): something the
  benchmark needs is missing here (the emulators, a container engine); the reason is on stderr.
"""

from __future__ import annotations

import argparse
import compileall
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
CANNOT_RUN = 77


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, **quick: Any
) -> argparse.Namespace:
    """Parse ``argv`` with ``--quick`` added: it makes ``quick`` the defaults (keyword names are
    the options' ``dest``), so an option given on the command line still wins."""
    sizes = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in quick.items() if v is not None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the same code paths at a tiny size, in a few seconds (as {sizes or 'given'})",
    )
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def cannot_run(reason: str) -> NoReturn:
    """Stop with :data:`CANNOT_RUN`: this machine lacks what the benchmark needs."""
    print(f"cannot run here: {reason}", file=sys.stderr)
    sys.exit(CANNOT_RUN)


def compile_project() -> None:
    """Compile the project's bytecode, as an installed package has it: where
    ``PYTHONDONTWRITEBYTECODE`` is set, every process would otherwise compile it again."""
    compileall.compile_dir(REPO / "runner", quiet=1)
    compileall.compile_dir(REPO / "worker", quiet=1)
