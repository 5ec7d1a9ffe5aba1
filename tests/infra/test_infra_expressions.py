"""The stack's own expressions, evaluated by Terraform for real variable values.

Only the parts that depend on variables alone (group scope, counts, default names, validation)
are copied out of the synthesized JSON into a provider-free configuration, which ``terraform
apply`` evaluates offline. Resource attributes that need Google Cloud are not evaluated here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.prerequisites import missing

if TYPE_CHECKING:
    from conftest import Synth

pytestmark = pytest.mark.infra


@pytest.fixture(scope="session", autouse=True)  # before the synthesis: nothing to evaluate it
def _terraform() -> None:
    if shutil.which("terraform") is None:
        missing(
            "the terraform CLI is not installed (cdktf deploys with it): see"
            " https://developer.hashicorp.com/terraform/install"
        )


def _expressions(synth: Synth) -> dict[str, str]:
    (zonal,) = synth.resources("google_compute_instance_group_manager")
    (regional,) = synth.resources("google_compute_region_instance_group_manager")
    (bucket,) = synth.resources("google_storage_bucket")
    (leave,) = synth.resources("google_project_iam_custom_role")
    (account,) = synth.resources("google_service_account")
    var_only = {n: o["value"] for n, o in synth.tf["output"].items() if "var." in o["value"]}
    return {
        **{n: v for n, v in var_only.items() if "google_" not in v},
        "zonal_count": zonal["count"],
        "regional_count": regional["count"],
        "bucket_name": bucket["name"],
        "leave_role_id": leave["role_id"],
        "account_id": account["account_id"],
        "zonal_size_ok": zonal["lifecycle"]["precondition"][0]["condition"],
        "regional_size_ok": regional["lifecycle"]["precondition"][0]["condition"],
    }


def _evaluate(synth: Synth, tmp_path: Path, **variables: str) -> dict[str, Any]:
    config = {
        "variable": synth.tf["variable"],
        "output": {name: {"value": value} for name, value in _expressions(synth).items()},
    }
    (tmp_path / "main.tf.json").write_text(json.dumps(config))
    (tmp_path / "cli.tfrc").write_text("")
    env = {
        **os.environ,
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
        "TF_CLI_CONFIG_FILE": str(tmp_path / "cli.tfrc"),
    }
    args = [f"-var={k}={v}" for k, v in variables.items()]
    for command in (["init", "-input=false"], ["apply", "-auto-approve", "-input=false", *args]):
        proc = subprocess.run(
            ["terraform", *command, "-no-color"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise AssertionError(proc.stdout + proc.stderr)
    out = subprocess.run(
        ["terraform", "output", "-json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {k: v["value"] for k, v in json.loads(out.stdout).items()}


def test_default_deployment_is_one_regional_group(synth: Synth, tmp_path: Path) -> None:
    values = _evaluate(synth, tmp_path, project="acme-batch")
    assert values["zone"] == ""
    assert values["group_scope"] == "regional"
    assert (values["zonal_count"], values["regional_count"]) == (0, 1)
    assert values["group"] == "cflow-workers"
    assert values["bucket_name"] == "acme-batch-cflow"
    assert values["account_id"] == "cflow-worker"
    assert values["leave_role_id"] == "cflow_worker_leave_group"
    assert (values["zonal_size_ok"], values["regional_size_ok"]) == (True, True)


def test_group_sizes_past_the_limits_fail_their_precondition(synth: Synth, tmp_path: Path) -> None:
    values = _evaluate(synth, tmp_path, project="acme-batch", shard_count="1500")
    assert (values["zonal_size_ok"], values["regional_size_ok"]) == (False, True)
    values = _evaluate(synth, tmp_path, project="acme-batch", shard_count="2001")
    assert values["regional_size_ok"] is False


def test_a_zone_gives_one_zonal_group(synth: Synth, tmp_path: Path) -> None:
    values = _evaluate(
        synth,
        tmp_path,
        project="acme-batch",
        zone="us-central1-b",
        name_prefix="team-a",
        bucket_name="acme-data-x",
    )
    assert (values["zone"], values["group_scope"]) == ("us-central1-b", "zonal")
    assert (values["zonal_count"], values["regional_count"]) == (1, 0)
    assert values["group"] == "team-a-workers"
    assert values["bucket_name"] == "acme-data-x"
    assert values["leave_role_id"] == "team_a_worker_leave_group"  # custom role ids: no hyphens


@pytest.mark.parametrize("prefix", ["Team", "a", "cflow-", "much-too-long-a-prefix"])
def test_name_prefix_is_validated(synth: Synth, tmp_path: Path, prefix: str) -> None:
    with pytest.raises(AssertionError, match="name_prefix must be"):
        _evaluate(synth, tmp_path, project="acme-batch", name_prefix=prefix)


@pytest.mark.parametrize("hours", ["0", "1.5"])
def test_max_vm_hours_is_validated(synth: Synth, tmp_path: Path, hours: str) -> None:
    with pytest.raises(AssertionError, match="max_vm_hours must be"):
        _evaluate(synth, tmp_path, project="acme-batch", max_vm_hours=hours)
