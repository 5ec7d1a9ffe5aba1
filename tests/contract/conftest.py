"""The contract suite's backends: every factory here runs the same queue, store and event tests.

A factory takes the pytest ``request`` and a temporary directory and returns open
:class:`worker.backends.base.Backends`; the Google Cloud backends register themselves beside the
local one, so both pass the same tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.emulators import contract_backends
from worker.backends.base import Backends
from worker.backends.local.backend import open_local

Factory = Callable[[pytest.FixtureRequest, Path], Backends]


def _local(request: pytest.FixtureRequest, tmp_path: Path) -> Backends:
    return open_local(tmp_path / "store", lease_seconds=2.0, max_deliveries=3)


FACTORIES: dict[str, Factory] = {"local": _local, "gcp": contract_backends}


@pytest.fixture(params=sorted(FACTORIES))
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backends]:
    opened = FACTORIES[request.param](request, tmp_path)
    try:
        yield opened
    finally:
        opened.close()
