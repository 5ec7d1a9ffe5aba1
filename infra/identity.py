"""The workers' identity: one service account, each right granted on the resource it is for.

No keys are created: the VMs get short-lived tokens from the metadata server.
"""

from __future__ import annotations

from cdktf import Fn, TerraformIterator, Token
from cdktf_cdktf_provider_google.project_iam_custom_role import ProjectIamCustomRole
from cdktf_cdktf_provider_google.project_iam_member import (
    ProjectIamMember,
    ProjectIamMemberCondition,
)
from cdktf_cdktf_provider_google.pubsub_subscription import PubsubSubscription
from cdktf_cdktf_provider_google.pubsub_subscription_iam_member import PubsubSubscriptionIamMember
from cdktf_cdktf_provider_google.pubsub_topic import PubsubTopic
from cdktf_cdktf_provider_google.pubsub_topic_iam_member import PubsubTopicIamMember
from cdktf_cdktf_provider_google.service_account import ServiceAccount
from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
from cdktf_cdktf_provider_google.storage_bucket_iam_member import StorageBucketIamMember
from constructs import Construct

# What a worker needs to remove its own VM from the group when it has been idle too long.
SELF_DELETE_PERMISSIONS = [
    "compute.instanceGroupManagers.get",
    "compute.instanceGroupManagers.update",
    "compute.instances.delete",
]


class Identity(Construct):
    """The worker service account and its grants.

    Attributes:
        service_account: the account the VMs run as; ``service_account.email``.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        project: str,
        name_prefix: str,
        bucket: StorageBucket,
        work_topic: PubsubTopic,
        work_subscription: PubsubSubscription,
        events_topic: PubsubTopic,
        group_name: str,
        instance_name_prefix: str,
        input_buckets: list[str],
    ) -> None:
        super().__init__(scope, id)
        self.service_account = ServiceAccount(
            self,
            "worker",
            account_id=f"{name_prefix}-worker",
            display_name="CFlow worker VMs",
            description="Pulls shards, writes their results, removes its own idle VM.",
        )
        member = self.service_account.member

        StorageBucketIamMember(
            self,
            "bucket_objects",
            bucket=bucket.name,
            role="roles/storage.objectUser",  # read bundles and inputs, write logs and outputs
            member=member,
        )
        inputs = TerraformIterator.from_list(input_buckets)  # for_each = toset(var.input_buckets)
        StorageBucketIamMember(
            self,
            "input_objects",
            for_each=inputs,
            bucket=Token.as_string(inputs.value),
            role="roles/storage.objectViewer",
            member=member,
        )
        PubsubSubscriptionIamMember(
            self,
            "pulls_work",
            subscription=work_subscription.name,
            role="roles/pubsub.subscriber",
            member=member,
        )
        # Reading the subscription tells a worker its topic when it was not given the topic.
        PubsubSubscriptionIamMember(
            self,
            "reads_work_subscription",
            subscription=work_subscription.name,
            role="roles/pubsub.viewer",
            member=member,
        )
        # A failed shard is re-published with its failure count, then the old message acked.
        PubsubTopicIamMember(
            self,
            "requeues_work",
            topic=work_topic.name,
            role="roles/pubsub.publisher",
            member=member,
        )
        PubsubTopicIamMember(
            self,
            "publishes_events",
            topic=events_topic.name,
            role="roles/pubsub.publisher",
            member=member,
        )
        # Log writing has no narrower scope than the project.
        ProjectIamMember(
            self,
            "writes_logs",
            project=project,
            role="roles/logging.logWriter",
            member=member,
        )

        role_id = Fn.replace(f"{name_prefix}_worker_self_delete", "-", "_")
        self.self_delete_role = ProjectIamCustomRole(
            self,
            "self_delete_role",
            project=project,
            role_id=role_id,
            title="CFlow worker: remove own VM from its group",
            permissions=SELF_DELETE_PERMISSIONS,
        )
        # Compute Engine has no IAM on instance group managers, so the grant is project-level
        # with a condition naming the one group and its instances.
        ProjectIamMember(
            self,
            "deletes_own_vm",
            project=project,
            role=self.self_delete_role.name,
            member=member,
            condition=ProjectIamMemberCondition(
                title="only the CFlow worker group",
                description="The worker group and the VMs it creates; nothing else.",
                expression=(
                    '(resource.type == "compute.googleapis.com/InstanceGroupManager"'
                    f' && resource.name.endsWith("/instanceGroupManagers/{group_name}"))'
                    ' || (resource.type == "compute.googleapis.com/Instance"'
                    ' && resource.name.extract("/instances/{name}")'
                    f'.startsWith("{instance_name_prefix}-"))'
                ),
            ),
        )
