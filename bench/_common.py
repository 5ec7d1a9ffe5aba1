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
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from tests.emulators import Emulators

REPO = Path(__file__).resolve().parents[1]
CANNOT_RUN = 77
T = TypeVar("T")


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, **quick: Any
) -> argparse.Namespace:
    """Parse ``argv`` with ``--quick`` added: it makes ``quick`` the defaults (keyword names are
    the options' ``dest``), so an option given on the command line still wins."""
    sizes = " ".join(_option(k, v) for k, v in quick.items() if v is not None)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"the same code paths at a tiny size, in a few seconds (as {sizes or 'given'})",
    )
    first, _ = parser.parse_known_args(argv)
    if first.quick:
        parser.set_defaults(**quick)
    return parser.parse_args(argv)


def _option(dest: str, value: Any) -> str:
    """How ``value`` for ``dest`` is written on the command line."""
    flag = "--" + dest.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, list):
        return " ".join([flag, *map(str, value)])
    return f"{flag} {value}"


def cannot_run(reason: str) -> NoReturn:
    """Stop with :data:`CANNOT_RUN`: this machine lacks what the benchmark needs."""
    print(f"cannot run here: {reason}", file=sys.stderr)
    sys.exit(CANNOT_RUN)


def start_emulators(*, reuse: bool = False) -> Emulators:
    """The Google Cloud emulators (``tests/emulators.py``), adopted as this process's own;
    :func:`cannot_run` without them.

    With ``reuse`` (a quick form), the emulators named by ``PUBSUB_EMULATOR_HOST`` and
    ``STORAGE_EMULATOR_HOST``, when both answer, are used instead of a pair started here: a test
    running the quick form passes its own, which saves a JVM start on a busy machine, and
    ``stop()`` leaves them running (it stops only what was started here). A full form always
    starts its own, so its figures never share an emulator with anything else.
    """
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests import emulators

    pubsub, gcs = os.environ.get("PUBSUB_EMULATOR_HOST"), os.environ.get("STORAGE_EMULATOR_HOST")
    if reuse and pubsub and gcs and _answers(pubsub) and _answers(gcs.removeprefix("http://")):
        started = emulators.Emulators(pubsub, gcs, procs=[], logdir=Path(os.devnull))
    else:
        try:
            started = emulators.start_emulators()
        except (RuntimeError, OSError) as exc:
            cannot_run(f"the emulators: {exc}")
    emulators.adopt(started)
    return started


def _answers(address: str) -> bool:
    """Something listens at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def compile_project() -> None:
    """Compile the project's bytecode, as an installed package has it, and let the processes the
    benchmark starts write the bytecode of what they import (the dev venv is installed
    uncompiled): where ``PYTHONDONTWRITEBYTECODE`` is set, every process would otherwise compile
    its imports again, and the figures would be of the compiler."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False  # and this process
    compileall.compile_dir(REPO / "runner", quiet=1)
    compileall.compile_dir(REPO / "worker", quiet=1)


def checkout(path: Path) -> Path:
    """``--other DIR``, a checkout of another version of this project (``git worktree add DIR
    COMMIT``), resolved; a clear stop where it is not one."""
    other = path.resolve()
    if not (other / "cflow").is_dir():
        raise SystemExit(f"--other {other}: no cflow there; give a checkout of this project")
    return other


def in_tree(tree: Path, script: str, argv: list[str]) -> Any:
    """``script``, a benchmark of this checkout, run with ``argv`` on the code of the checkout
    ``tree`` (first on its import path); its last line of output, read as JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(REPO / "bench")])}
    done = subprocess.run(
        [sys.executable, script, *argv], cwd=tree, env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def alternate(
    other: Path, rounds: int, measure: Callable[[Path], T], line: Callable[[str, T], str]
) -> dict[str, list[T]]:
    """``measure`` of the checkout ``other`` and of this one in turn, ``rounds`` times each (a
    slow spell of the machine falls on both); each result's ``line`` printed as it comes."""
    rows: dict[str, list[T]] = {"other": [], "this": []}
    for _ in range(rounds):
        for tag, tree in (("other", other), ("this", REPO)):
            rows[tag].append(measure(tree))
            print(line(tag, rows[tag][-1]), flush=True)
    print()
    return rows


def child_or_ready(args: argparse.Namespace, measure: Callable[[argparse.Namespace], Any]) -> bool:
    """A benchmark that runs itself in another checkout (:func:`in_tree`), as it starts:
    ``args.work`` made; with ``--json`` (the run in the other tree), what ``measure`` gives
    printed as one line and True; else the project compiled (:func:`compile_project`)."""
    args.work.mkdir(parents=True, exist_ok=True)
    if args.json:
        print(json.dumps(measure(args)))
        return True
    compile_project()
    return False
