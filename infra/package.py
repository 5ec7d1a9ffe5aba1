"""Ship the worker to the VMs: the wheel built from ``worker/``, uploaded to the bucket.

No hand-built image: every VM downloads this object at boot, checks its SHA-256 and installs it.
The object name holds the SHA-256, so a new worker is a new object, which changes the instance
template's metadata and so rolls a new template; an unchanged worker changes nothing.
"""

from __future__ import annotations

from pathlib import Path

from cdktf import AssetType, TerraformAsset
from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
from cdktf_cdktf_provider_google.storage_bucket_object import StorageBucketObject
from constructs import Construct

from infra.wheel import build_worker_wheel

OBJECT_PREFIX = "worker/"


class WorkerPackage(Construct):
    """The worker wheel as a bucket object.

    Attributes:
        object: the bucket object.
        url: its ``gs://`` URL, for the startup script.
        sha256: the wheel's SHA-256, which the startup script verifies.
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
