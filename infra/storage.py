"""The bucket: task bundles, run manifests, shard logs, outputs and the worker package."""

from __future__ import annotations

from cdktf import Fn, Op, Token
from cdktf_cdktf_provider_google.storage_bucket import (
    StorageBucket,
    StorageBucketLifecycleRule,
    StorageBucketLifecycleRuleAction,
    StorageBucketLifecycleRuleCondition,
    StorageBucketSoftDeletePolicy,
    StorageBucketVersioning,
)
from constructs import Construct

RUNS_PREFIX = "runs/"  # per-run data, expired after the retention (the bucket layout is in DESIGN)


class Storage(Construct):
    """One regional bucket next to the VMs: uniform access, never public, cleaned by destroy.

    Attributes:
        bucket: the bucket; ``bucket.name`` is what the runner and the workers use.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        project: str,
        location: str,
        name_prefix: str,
        bucket_name: str,
        retention_days: float,
    ) -> None:
        super().__init__(scope, id)
        default_name = f"{project}-{name_prefix}"
        # `length < 1`, not `== ""`: cdktf 0.21 renders a "" or 0 operand as `undefined`.
        self.bucket = StorageBucket(
            self,
            "bucket",
            name=Token.as_string(
                Fn.conditional(Op.lt(Fn.length_of(bucket_name), 1), default_name, bucket_name)
            ),
            location=location,
            storage_class="STANDARD",
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            # `cdktf destroy` removes the bucket even when runs left objects in it.
            force_destroy=True,
            # Objects are written once per attempt (create-only commits); history is not needed.
            versioning=StorageBucketVersioning(enabled=False),
            # No soft delete: a bucket keeps deleted objects 7 days by default, billed, and CFlow
            # deletes a lot (compose intermediates, header-less copies, `runner rm`, the runs/
            # expiry). "To disable the soft delete policy on a bucket, this field must be set to
            # 0" (Terraform google provider, storage_bucket soft_delete_policy); Google's advice
            # for buckets with many composes is the same
            # (https://cloud.google.com/storage/docs/composing-objects).
            soft_delete_policy=StorageBucketSoftDeletePolicy(retention_duration_seconds=0),
            lifecycle_rule=[
                StorageBucketLifecycleRule(
                    action=StorageBucketLifecycleRuleAction(type="Delete"),
                    condition=StorageBucketLifecycleRuleCondition(
                        age=retention_days, matches_prefix=[RUNS_PREFIX]
                    ),
                ),
                StorageBucketLifecycleRule(
                    action=StorageBucketLifecycleRuleAction(type="AbortIncompleteMultipartUpload"),
                    condition=StorageBucketLifecycleRuleCondition(age=1),
                ),
            ],
        )
