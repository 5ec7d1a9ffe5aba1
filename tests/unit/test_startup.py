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


# Ctrl-C landing where the tester's did, made certain: in the import of a command's module, or
# in typer's reading of a command's signature as the CLI starts.
_INTERRUPTED = {
    "import": (
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'runner.cli.manage':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
    ),
    "signature": (
        "import typer.utils\n"
        "def interrupted(*args, **kwargs):\n"
        "    raise KeyboardInterrupt\n"
        "typer.utils.get_type_hints = interrupted\n"
    ),
}


@pytest.mark.parametrize("where", sorted(_INTERRUPTED))
def test_ctrl_c_while_the_cli_starts_exits_130_without_a_traceback(
    tmp_path: Path, where: str
) -> None:
    """Ctrl-C in a submit's first 0.2 s printed a KeyboardInterrupt traceback."""
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.py").write_text("def run(shard):\n    pass\n")
    code = (
        "import runpy, sys\n"
        + _INTERRUPTED[where]
        + "sys.argv = ['runner', 'submit', 'task', '--shards', '20000']\n"
        "runpy.run_module('runner', run_name='__main__')\n"
    )
    env = {**os.environ, "CFLOW_STORE": str(tmp_path / "store"), "PYTHONPATH": str(REPO)}
    env.pop("CFLOW_DEPLOYMENT", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (proc.returncode, proc.stderr, proc.stdout) == (130, "", "")
    assert not (tmp_path / "store").exists()
