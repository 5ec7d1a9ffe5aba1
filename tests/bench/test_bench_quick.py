"""Every benchmark still runs: its quick form (``--quick``), each in a process of its own.

A benchmark is any ``bench/*.py`` whose name does not start with ``_`` (shared code), found
when the tests are collected, so a new one is run from the day it lands. It fails here when it
crashes, rejects ``--quick`` or prints nothing; :mod:`tests.bench.quick` says how a machine that
cannot run it is told apart. A quick form runs the same code at a tiny size, so its figures
mean nothing and are not checked; ``make bench`` runs the full forms, whose figures
``bench/README.md`` keeps.

A quick form that is a test's whole work is left to that test (:data:`RUN_BY_A_TEST`), which
runs it the same way and also checks what it prints: ``bench/chaos.py --quick`` is the chaos
soak's short form in ``tests/gcp/test_chaos.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import emulators
from tests.bench.quick import BENCH, run_quick

RUN_BY_A_TEST = {"chaos": "tests/gcp/test_chaos.py"}
BENCHMARKS = sorted(
    p for p in BENCH.glob("*.py") if not p.name.startswith("_") and p.stem not in RUN_BY_A_TEST
)


def _marks(path: Path) -> list[pytest.MarkDecorator]:
    source = path.read_text(encoding="utf-8")
    marks = [pytest.mark.e2e]
    if "emulators" in source:
        marks.append(pytest.mark.emulator)
    if "tests.containers" in source:  # the test images: built and used beside the container tests
        marks.append(pytest.mark.xdist_group("containers"))
    return marks


def test_benchmarks_are_found() -> None:
    names = {p.stem for p in BENCHMARKS}
    assert {"local_overhead", "simulate", "gcp_calls", "container_overhead"} <= names


def test_the_quick_forms_left_to_a_test_are_run_there() -> None:
    root = BENCH.parent
    for name, test in RUN_BY_A_TEST.items():
        assert (BENCH / f"{name}.py").exists(), name
        assert f"bench/{name}.py" in (root / test).read_text(encoding="utf-8"), test


@pytest.mark.parametrize("bench", [pytest.param(p, id=p.stem, marks=_marks(p)) for p in BENCHMARKS])
def test_quick_form_runs(bench: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """It runs; one that takes ``--work`` (where its stores go: ``bench/out`` unless told)
    leaves nothing there, so that running it again and again never fills the disk."""
    if request.node.get_closest_marker("emulator"):
        emulators.emulators()  # this process's, which the quick form uses rather than start two
    if '"--work"' not in bench.read_text(encoding="utf-8"):
        run_quick(bench, tmp_path)
        return
    work = tmp_path / "work"
    run_quick(bench, tmp_path, "--work", str(work))
    assert not work.exists() or not any(work.iterdir()), sorted(p.name for p in work.iterdir())
