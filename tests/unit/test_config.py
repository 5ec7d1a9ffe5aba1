from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.config import Backend, resolve
from worker.errors import ConfigError

OUTPUTS = {
    "cflow": {
        "project": "p1",
        "region": "europe-west1",
        "zone": "europe-west1-b",
        "bucket": "b1",
        "work_topic": "w",
        "work_subscription": "ws",
        "events_topic": "e",
        "events_subscription": "es",
        "dead_letter_subscription": "ds",
        "group": "g",
    }
}


def test_no_deployment_means_local(tmp_path: Path) -> None:
    cfg = resolve(environ={}, cwd=tmp_path)
    assert cfg.backend is Backend.LOCAL and cfg.store_dir == tmp_path / ".cflow"


def test_outputs_file_then_env_then_flags(tmp_path: Path) -> None:
    (tmp_path / "cflow-outputs.json").write_text(json.dumps(OUTPUTS))
    cfg = resolve(
        environ={"CFLOW_BUCKET": "from-env"}, cwd=tmp_path, overrides={"zone": "from-flag"}
    )
    assert cfg.backend is Backend.GCP and cfg.project == "p1"
    assert cfg.bucket == "from-env" and cfg.zone == "from-flag"
    assert resolve(local=True, environ={}, cwd=tmp_path).backend is Backend.LOCAL


def test_incomplete_deployment_is_reported_per_field(tmp_path: Path) -> None:
    partial = {"cflow": {k: v for k, v in OUTPUTS["cflow"].items() if k not in ("bucket", "group")}}
    (tmp_path / "cflow-outputs.json").write_text(json.dumps(partial))
    with pytest.raises(ConfigError, match="missing bucket, group"):
        resolve(environ={}, cwd=tmp_path)


def test_unreadable_outputs_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        resolve(environ={}, cwd=tmp_path, deployment_file=tmp_path / "x.json")
