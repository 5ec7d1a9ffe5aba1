"""The runner reads the outputs file exactly as ``cdktf deploy --outputs-file`` writes it.

cdktf 0.21 (``@cdktf/cli-core``, ``lib/output.ts``) builds that file from ``terraform output
-json`` (``{name: {sensitive, type, value}}``) and the synthesized stack's ``"//".outputs`` map
(``{stack: {construct id: output name}}``): it nests the values by stack and construct id, keeps
only ``value``, and leaves out sensitive outputs unless
``--outputs-file-include-sensitive-outputs`` is given. ``cdktf_outputs_file`` below does the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from runner.config import Backend, resolve

if TYPE_CHECKING:
    from conftest import Synth

pytestmark = pytest.mark.infra

PROJECT = "acme-batch"


def cdktf_outputs_file(
    stack_json: dict[str, Any], terraform_output: dict[str, Any], *, include_sensitive: bool = True
) -> dict[str, Any]:
    """What cdktf writes to ``--outputs-file`` (getConstructIdsForOutputs + saveOutputs)."""

    def by_construct_id(mapping: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in mapping.items():
            if isinstance(value, str):
                if value in terraform_output:
                    out[key] = terraform_output[value]
            elif nested := by_construct_id(value):
                out[key] = nested
        return out

    def unpack(outputs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, entry in outputs.items():
            if "value" in entry and "type" in entry:
                if not entry["sensitive"] or include_sensitive:
                    out[key] = entry["value"]  # JSON.stringify drops undefined ones
            else:
                out[key] = unpack(entry)
        return out

    return unpack(by_construct_id(stack_json["//"]["outputs"]))


def terraform_output(synth: Synth, *, zone: str) -> dict[str, Any]:
    """A realistic ``terraform output -json`` after deploying with the default variables."""
    values = {
        "project": PROJECT,
        "region": "us-central1",
        "zone": zone,
        "bucket": f"{PROJECT}-cflow",
        "work_topic": "cflow-work",
        "work_subscription": "cflow-work",
        "events_topic": "cflow-events",
        "events_subscription": "cflow-events",
        "dead_letter_topic": "cflow-dead-letter",
        "dead_letter_subscription": "cflow-dead-letter",
        "group": "cflow-workers",
        "group_scope": "zonal" if zone else "regional",
        "worker_service_account": f"cflow-worker@{PROJECT}.iam.gserviceaccount.com",
        "image_repository": f"us-central1-docker.pkg.dev/{PROJECT}/cflow-images",
        "gpu_image": "",
        "container_image": "",
        "worker_python": "3.11",
    }
    assert set(values) == set(synth.tf["output"])
    return {
        name: {
            "sensitive": bool(body.get("sensitive", False)),
            "type": "string",
            "value": values[name],
        }
        for name, body in synth.tf["output"].items()
    }


def test_outputs_file_is_nested_by_stack(synth: Synth) -> None:
    written = cdktf_outputs_file(synth.tf, terraform_output(synth, zone=""))
    assert list(written) == ["cflow"]
    assert written["cflow"]["bucket"] == f"{PROJECT}-cflow"
    assert written["cflow"]["zone"] == ""


def test_runner_reads_a_regional_deployment(synth: Synth, tmp_path: Path) -> None:
    path = tmp_path / "cflow-outputs.json"
    path.write_text(
        json.dumps(cdktf_outputs_file(synth.tf, terraform_output(synth, zone="")), indent=2)
    )
    config = resolve(deployment_file=path, environ={}, cwd=tmp_path)
    assert config.backend is Backend.GCP
    assert config.deployment_file == path
    assert (config.project, config.bucket, config.group) == (
        PROJECT,
        f"{PROJECT}-cflow",
        "cflow-workers",
    )
    assert (config.work_topic, config.work_subscription) == ("cflow-work", "cflow-work")
    assert (config.events_topic, config.events_subscription) == ("cflow-events", "cflow-events")
    assert config.dead_letter_subscription == "cflow-dead-letter"
    assert (config.region, config.zone) == ("us-central1", "")


def test_runner_finds_the_outputs_file_in_the_working_directory(
    synth: Synth, tmp_path: Path
) -> None:
    written = cdktf_outputs_file(synth.tf, terraform_output(synth, zone="us-central1-b"))
    (tmp_path / "cflow-outputs.json").write_text(json.dumps(written, indent=2))
    config = resolve(environ={}, cwd=tmp_path)
    assert config.backend is Backend.GCP
    assert config.deployment_file == tmp_path / "cflow-outputs.json"
    assert config.zone == "us-central1-b"
