"""Running a benchmark's quick form (``bench/X.py --quick``) from a test, in a process of its own.

Exit status 77 says the machine lacks what the benchmark needs (the emulators, a container
engine): a skip, and under ``CI=true`` a failure, as for the tests that need the same.
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
BENCH = ROOT / "bench"
CANNOT_RUN = 77  # bench/_common.py
# A guard against a form that is not quick, or hangs; each quick form takes seconds here.
QUICK_LIMIT = 240  # seconds; with the grace below, within the suite's 300 s a test
STOP_GRACE = 30  # seconds a benchmark stopped for running over has to clean up


def _stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt the benchmark, as Ctrl-C would, so that it removes what it started (emulators,
    containers); then kill whatever of its process group is left."""
    proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=STOP_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def run_quick(bench: Path, cwd: Path, *args: str) -> str:
    """Run ``bench --quick ARGS`` in ``cwd`` (without the caller's ``CFLOW_*`` settings, with its
    emulators' addresses, which a quick form uses when they answer); return its stdout. Fails
    the test when it runs over :data:`QUICK_LIMIT`, exits non-zero or prints nothing; skips it
    (fails it under ``CI=true``) when the machine cannot run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CFLOW_")}
    proc = subprocess.Popen(
        [sys.executable, str(bench), "--quick", *args],
        cwd=cwd,
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
    return stdout
