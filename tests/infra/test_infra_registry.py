"""The Artifact Registry repository for run images, and the worker's read-only grant on it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from infra.contract import READER_ROLE  # plain: collecting this module loads no CDKTF

if TYPE_CHECKING:
    from conftest import Synth

pytestmark = pytest.mark.infra


def test_the_stack_declares_one_docker_repository_in_the_region(synth: Synth) -> None:
    (repo,) = synth.resources("google_artifact_registry_repository")
    assert repo["format"] == "DOCKER"
    assert repo["location"] == "${var.region}"
    assert repo["repository_id"] == "${var.name_prefix}-images"
    assert repo["project"] == "${var.project}"


def test_the_worker_may_only_read_that_repository(synth: Synth) -> None:
    (grant,) = synth.resources("google_artifact_registry_repository_iam_member")
    assert grant["role"] == READER_ROLE == "roles/artifactregistry.reader"
    repo_name = synth.ref("google_artifact_registry_repository", "name", format="DOCKER")
    assert grant["repository"] == repo_name
    assert grant["member"] == synth.ref("google_service_account", "member")
    # No other Artifact Registry right anywhere: not on the project, not a writer role.
    for kind in (
        "google_project_iam_member",
        "google_artifact_registry_repository_iam_member",
        "google_artifact_registry_repository_iam_binding",
        "google_artifact_registry_repository_iam_policy",
    ):
        roles = [r.get("role", "") for r in synth.resources(kind)]
        assert [r for r in roles if "artifactregistry" in r and r != READER_ROLE] == []
    project_roles = [r["role"] for r in synth.resources("google_project_iam_member")]
    assert READER_ROLE not in project_roles


def test_the_repository_url_is_an_output(synth: Synth) -> None:
    value = synth.tf["output"]["image_repository"]["value"]
    assert value.startswith("${google_artifact_registry_repository.")
    assert "-docker.pkg.dev/" in value
    assert value.endswith(".repository_id}")
