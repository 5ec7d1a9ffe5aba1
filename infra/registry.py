"""The run images' home: one Docker repository in Artifact Registry, readable by the workers.

A run's ``--image`` is pulled by each VM from here (``<region>-docker.pkg.dev/<project>/<repo>``).
The worker service account gets ``roles/artifactregistry.reader`` on this repository only: it
can pull the images, never push one nor read another repository of the project.

The Artifact Registry API is off in a fresh project, and a repository cannot be made until it is
on ("Before you begin: Enable Artifact Registry, including enabling the Artifact Registry API",
https://cloud.google.com/artifact-registry/docs/manage-repos): the stack enables it, and leaves it
on at destroy (other things in the project may use it).
"""

from __future__ import annotations

from cdktf_cdktf_provider_google.artifact_registry_repository import (
    ArtifactRegistryRepository,
)
from cdktf_cdktf_provider_google.artifact_registry_repository_iam_member import (
    ArtifactRegistryRepositoryIamMember,
)
from cdktf_cdktf_provider_google.project_service import ProjectService
from constructs import Construct

from infra.contract import READER_ROLE, STACK_ENABLED_APIS


class Registry(Construct):
    """A Docker-format repository for run images, and the worker's read grant on it.

    Attributes:
        apis: the APIs the stack enables (Artifact Registry's), which the repository waits for.
        repository: the repository resource.
        url: where images go, ``<region>-docker.pkg.dev/<project>/<repository id>``.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        project: str,
        region: str,
        name_prefix: str,
        reader_member: str,
    ) -> None:
        super().__init__(scope, id)
        self.apis = [
            ProjectService(
                self,
                f"api_{service.split('.', 1)[0]}",
                project=project,
                service=service,
                disable_on_destroy=False,
                disable_dependent_services=False,
            )
            for service in STACK_ENABLED_APIS
        ]
        self.repository = ArtifactRegistryRepository(
            self,
            "images",
            project=project,
            location=region,  # beside the VMs: pulls stay in the region
            repository_id=f"{name_prefix}-images",
            format="DOCKER",
            description="Container images that CFlow runs use (--image).",
            depends_on=self.apis,
        )
        ArtifactRegistryRepositoryIamMember(
            self,
            "worker_reads_images",
            project=project,
            location=self.repository.location,
            repository=self.repository.name,
            role=READER_ROLE,
            member=reader_member,
        )
        self.url = (
            f"{self.repository.location}-docker.pkg.dev/"
            f"{self.repository.project}/{self.repository.repository_id}"
        )
