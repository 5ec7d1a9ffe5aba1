"""Test-session wiring shared by every folder.

``make test`` runs the suite in several processes (pytest-xdist, ``--dist loadgroup``): most
tests wait on real processes and emulators, not on the CPU. Tests that share costly
session-wide set-up stay in one process each: the container tests (their images are built once
per machine, and two builds of the same image at once would each do all the work) and the CDKTF
synthesis (several seconds per process). Every process starts emulators of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_GROUPS = {
    "tests/containers/": "containers",
    "tests/e2e/test_containers.py": "containers",
    "tests/infra/": "infra",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        rel = Path(str(item.path)).relative_to(root).as_posix()
        for prefix, group in _GROUPS.items():
            if rel.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
                break
