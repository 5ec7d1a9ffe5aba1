"""A local run's fixed cost is mostly interpreter starts: the runner and the worker must not load
the Google Cloud client libraries (the Compute client alone takes over a second to import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# importlib.metadata brings email, zipfile and csv: tens of milliseconds of a runner's start.
HEAVY = ("google.cloud", "google.api_core", "grpc", "matplotlib", "importlib.metadata")


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
