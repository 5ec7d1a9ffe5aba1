"""A local run's fixed cost is mostly interpreter starts: the runner and the worker must not load
the Google Cloud client libraries (the Compute client alone takes over a second to import)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# importlib.metadata brings email, zipfile and csv: tens of milliseconds of a runner's start;
# pydantic (typer 0.29 parses every option with it) about 0.1 s of each command.
HEAVY = ("google.cloud", "google.api_core", "grpc", "matplotlib", "importlib.metadata", "pydantic")


@pytest.mark.parametrize("module", ["runner.cli.main", "worker.cli", "worker.executors.host"])
def test_local_commands_do_not_import_cloud_clients(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.startswith({HEAVY!r}))))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert not loaded, f"{module} imports {loaded[:5]} at start; import them where they are used"


def test_a_local_submit_loads_no_cloud_code_while_it_runs(tmp_path: Path) -> None:
    """The whole command, parsing its options and running a run to its end, not only its
    imports: what it loaded is listed as it exits."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.py").write_text("def run(shard):\n    pass\n")
    heavy = (*HEAVY, "runner.backends.gcp.shapes.apply", "runner.backends.gcp.fleet")
    code = (
        "import atexit, runpy, sys\n"
        f"listed = lambda: sorted(m for m in sys.modules if m.startswith({heavy!r}))\n"
        "atexit.register(lambda: print(*listed()))\n"
        "sys.argv = ['runner', 'submit', 'task', '--shards', '2', '--workers', '1']\n"
        "runpy.run_module('runner', run_name='__main__')\n"
    )
    env = {**os.environ, "CFLOW_STORE": str(tmp_path / "store"), "PYTHONPATH": str(REPO)}
    env.pop("CFLOW_DEPLOYMENT", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()[1:]  # after the run id
    assert not loaded, f"runner submit loaded {loaded[:5]}; load them where they are used"
