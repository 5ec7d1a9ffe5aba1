"""Ship the worker to the VMs: the wheel built from ``worker/`` and a wheelhouse of its
dependencies, both uploaded to the bucket.

No hand-built image: every VM downloads these objects at boot, checks their SHA-256 and unpacks
the wheels into its venv (infra/scripts/startup.sh; no package index at boot, no versions of the
day: the dependencies are resolved here, pinned to this machine's versions, for the VMs' Python and
platform; see :mod:`runner.backends.gcp.wheels`). Object names hold the SHA-256, so a new worker or
new dependencies are new objects, which change the instance template's metadata and so roll a new
template; an unchanged worker changes nothing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from cdktf import AssetType, TerraformAsset
from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
from cdktf_cdktf_provider_google.storage_bucket_object import StorageBucketObject
from constructs import Construct

from infra.wheel import DISTRIBUTION, build_worker_wheel, worker_requirements
from runner.backends.gcp.wheels import installed_pins, resolve

OBJECT_PREFIX = "worker/"


class WorkerPackage(Construct):
    """The worker wheel as a bucket object.

    Attributes:
        object: the bucket object.
        url: its ``gs://`` URL, for the startup script.
        sha256: the wheel's SHA-256, which the startup script verifies.
        wheelhouse_url, wheelhouse_sha256: the same for the tar of its dependencies' wheels.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        bucket: StorageBucket,
        repo: Path,
        build_dir: Path,
    ) -> None:
        super().__init__(scope, id)
        wheel = build_worker_wheel(repo=repo, out_dir=build_dir)
        asset = TerraformAsset(self, "wheel", path=str(wheel.path), type=AssetType.FILE)
        self.sha256 = wheel.sha256
        self.object = StorageBucketObject(
            self,
            "object",
            bucket=bucket.name,
            name=f"{OBJECT_PREFIX}{wheel.sha256}/{wheel.filename}",
            source=asset.path,
            content_type="application/zip",
        )
        self.url = f"gs://{bucket.name}/{self.object.name}"

        project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
        house = resolve(
            worker_requirements(project),
            constraints=installed_pins(skip={"cflow", DISTRIBUTION}),
        )
        house_asset = TerraformAsset(self, "wheelhouse", path=str(house.path), type=AssetType.FILE)
        self.wheelhouse_sha256 = house.sha256
        self.wheelhouse = StorageBucketObject(
            self,
            "wheelhouse_object",
            bucket=bucket.name,
            name=f"{OBJECT_PREFIX}{house.sha256}/{house.filename}",
            source=house_asset.path,
            content_type="application/x-tar",
        )
        self.wheelhouse_url = f"gs://{bucket.name}/{self.wheelhouse.name}"
