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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    loadgroup = getattr(config.option, "loadgroup", False)  # set in an xdist worker
    for item in items:
        rel = Path(str(item.path)).relative_to(root).as_posix()
        for prefix, group in _GROUPS.items():
            if rel.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
                if loadgroup:
                    _name_group(item, group)
                break


def _name_group(item: pytest.Item, group: str) -> None:
    """Put ``@group`` at the end of the item's node id, which is how xdist's controller learns
    the group. xdist 3.8 writes it to ``item._nodeid``, which pytest 9 no longer reads (the id
    is ``item._id``, a parsed ``NodeId``): without this, loadgroup spread the container tests
    over every process, and tests sharing a run id saw each other's containers."""
    if "@" in item.nodeid or not hasattr(item, "_id"):
        return  # xdist did it (an older pytest), or a pytest whose ids we do not know
    from _pytest.nodes import coerce_node_id

    item._id = coerce_node_id(f"{item.nodeid}@{group}")
