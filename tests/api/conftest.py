"""The Python API's tests run on both backends: this machine's, and the Google Cloud path on
the emulators with real ``python -m worker --backend gcp`` processes in a fake group."""

from __future__ import annotations

import json
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cflow.driver import let_go
from runner.config import REQUIRED_FOR_GCP
from tests.e2e.conftest import cli
from tests.gcp.conftest import MakeCompute, fake_compute, worker_spawner

__all__ = ["cli", "fake_compute"]  # the end-to-end and Google Cloud tests' fixtures, by name

ZONE = "us-central1-a"
GROUP = "cflow-workers"


def _cloud(tmp_path: Path, fake_compute: MakeCompute) -> dict[str, Any]:
    """A fresh deployment on the emulators, its group's VMs real worker processes."""
    from tests import emulators  # starts the emulators on first use

    d = emulators.new_deployment()
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        d, logs=tmp_path / "vms", group=GROUP, zone=ZONE, endpoint=lambda: holder["endpoint"]
    )
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE)
    holder["endpoint"] = fake.endpoint
    path = tmp_path / "cflow-outputs.json"
    path.write_text(json.dumps(d.outputs(zone=ZONE, group=GROUP)))
    return {"deployment": str(path), "workers": 2}


@pytest.fixture(params=["local", pytest.param("gcp", marks=pytest.mark.emulator)])
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[dict[str, Any]]:
    """``cflow`` options for one backend: ``store=`` locally, ``deployment=`` on the
    emulators (the fake Compute API starts real workers as VMs)."""
    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    if request.param == "local":
        yield {"store": str(tmp_path / ".cflow"), "workers": 2}
        assert let_go(), _still_running()
        return
    fake_compute: MakeCompute = request.getfixturevalue("fake_compute")
    yield _cloud(tmp_path, fake_compute)
    assert let_go(), _still_running()  # before the fake group stops


def _still_running() -> str:
    """Where each run's thread of this process still is, for a run not let go in time."""
    frames = sys._current_frames()
    stacks = [
        f"thread {t.name}:\n" + "".join(traceback.format_stack(frames[t.ident]))
        for t in threading.enumerate()
        if t.name == "cflow-run" and t.ident in frames
    ]
    return "a run's workers were not let go within 60 s\n" + "\n".join(stacks)


@pytest.fixture
def cloud_outputs(tmp_path: Path) -> Path:
    """A deployment outputs file naming resources that do not exist: what is refused before
    anything is opened needs no emulator."""
    path = tmp_path / "cflow-outputs.json"
    fields = dict.fromkeys(REQUIRED_FOR_GCP, "cflow-x") | {"zone": ZONE}
    path.write_text(json.dumps(fields))
    return path


@pytest.fixture
def local_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``cflow`` options for a local run in a fresh store."""
    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    return {"store": str(tmp_path / ".cflow"), "workers": 2}
