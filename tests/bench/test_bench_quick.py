"""Every benchmark still runs: its quick form (``--quick``), each in a process of its own.

A benchmark is any ``bench/*.py`` whose name does not start with ``_`` (shared code), found
when the tests are collected, so a new one is run from the day it lands. It fails here when it
crashes, rejects ``--quick`` or prints nothing. Exit status 77 says the machine lacks what the
benchmark needs (the emulators, a container engine): a skip, and under ``CI=true`` a failure, as
for the tests that need the same. A quick form runs the same code at a tiny size, so its figures
mean nothing and are not checked; ``make bench`` runs the full forms, whose figures
``bench/README.md`` keeps.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
CANNOT_RUN = 77  # bench/_common.py
# A guard against a form that is not quick, or hangs; each quick form takes seconds here.
QUICK_LIMIT = 240  # seconds; with the grace below, within the suite's 300 s a test
STOP_GRACE = 30  # seconds a benchmark stopped for running over has to clean up


def _marks(path: Path) -> list[pytest.MarkDecorator]:
    source = path.read_text(encoding="utf-8")
    marks = [pytest.mark.e2e]
    if "emulators" in source:
        marks.append(pytest.mark.emulator)
    if "tests.containers" in source:  # the test images: built and used beside the container tests
        marks.append(pytest.mark.xdist_group("containers"))
    return marks


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt the benchmark, as Ctrl-C would, so that it removes what it started (emulators,
    containers); then kill whatever of its process group is left."""
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=STOP_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def test_benchmarks_are_found() -> None:
    names = {p.stem for p in BENCHMARKS}
    assert {"local_overhead", "simulate", "gcp_calls", "container_overhead"} <= names


@pytest.mark.parametrize("bench", [pytest.param(p, id=p.stem, marks=_marks(p)) for p in BENCHMARKS])
def test_quick_form_runs(bench: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFLOW_")}
    proc = subprocess.Popen(
        [sys.executable, str(bench), "--quick"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so whatever it started goes with it if it must be stopped
    )
    try:
        stdout, stderr = proc.communicate(timeout=QUICK_LIMIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{bench.name} --quick ran over {QUICK_LIMIT} s: its quick form is not quick")
    finally:
        if proc.poll() is None:  # over time, or the test was interrupted
            _stop(proc)
    said = f"stdout:\n{stdout[-3000:]}\nstderr:\n{stderr[-3000:]}"
    if proc.returncode == CANNOT_RUN:
        reason = f"{bench.name}: {stderr.strip()[-500:]}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    assert proc.returncode == 0, f"{bench.name} --quick exited with {proc.returncode}\n{said}"
    assert stdout.strip(), f"{bench.name} --quick printed no figures\n{said}"
