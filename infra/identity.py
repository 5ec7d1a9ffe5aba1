"""The workers' identity: one service account, each right granted on the resource it is for.

No keys are created: the VMs get short-lived tokens from the metadata server.
"""

from __future__ import annotations

from cdktf import Fn, TerraformIterator, Token
from cdktf_cdktf_provider_google.project_iam_custom_role import ProjectIamCustomRole
from cdktf_cdktf_provider_google.project_iam_member import ProjectIamMember
from cdktf_cdktf_provider_google.pubsub_subscription import PubsubSubscription
from cdktf_cdktf_provider_google.pubsub_subscription_iam_member import PubsubSubscriptionIamMember
from cdktf_cdktf_provider_google.pubsub_topic import PubsubTopic
from cdktf_cdktf_provider_google.pubsub_topic_iam_member import PubsubTopicIamMember
from cdktf_cdktf_provider_google.service_account import ServiceAccount
from cdktf_cdktf_provider_google.storage_bucket import StorageBucket
from cdktf_cdktf_provider_google.storage_bucket_iam_member import StorageBucketIamMember
from constructs import Construct

from infra.contract import LEAVE_GROUP_PERMISSIONS


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
        self._grant_objects(member, bucket=bucket, input_buckets=input_buckets)
        self._grant_messaging(
            member,
            work_topic=work_topic,
            work_subscription=work_subscription,
            events_topic=events_topic,
        )
        # Log writing has no narrower scope than the project.
        ProjectIamMember(
            self,
            "writes_logs",
            project=project,
            role="roles/logging.logWriter",
            member=member,
        )
        self._grant_leaving(member, project=project, name_prefix=name_prefix)

    def _grant_objects(
        self, member: str, *, bucket: StorageBucket, input_buckets: list[str]
    ) -> None:
        """Read and write the deployment's bucket; read the declared input buckets."""
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

    def _grant_messaging(
        self,
        member: str,
        *,
        work_topic: PubsubTopic,
        work_subscription: PubsubSubscription,
        events_topic: PubsubTopic,
    ) -> None:
        """Pull and requeue work; publish events."""
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

    def _grant_leaving(self, member: str, *, project: str, name_prefix: str) -> None:
        """The rights an idle worker needs to remove its own VM from the group."""
        # How an idle worker removes its own VM, and why the grant has the scope it has.
        #
        # IAM Conditions' resource attributes (resource.type, resource.name) are recognized only
        # for the resource types on Google's "conditions resource attributes" page; for Compute
        # Engine that list has Instance, Image, InstanceTemplate, ... but not
        # InstanceGroupManager, and Compute Engine has no IAM policy of its own on instance group
        # managers. A condition on the group therefore never matches and deleteInstances is
        # denied (403). So the group rights are granted at the project with no condition: that
        # works whatever the service does with conditions.
        #
        # What a worker (any code running on a worker VM: the deployer's own task) can do with
        # it: read every managed instance group in this project, resize them, and delete,
        # abandon or recreate their instances. It cannot create or delete groups, instance
        # templates, images, service accounts or IAM bindings, so it cannot run anything but
        # the group templates already there, nor widen its own rights. Why that is acceptable:
        # the VMs run only the deployer's code on the deployer's data; docs/google-cloud.md tells to
        # deploy CFlow in a project of its own, where its group is the only one; and the
        # alternatives either add a component to deploy and secure (a proxy function holding the
        # right) or break the promise that no VM outlives its work once the runner is detached.
        #
        # No right on the instances themselves: deleteInstances checks only the group right
        # on the caller, and the group deletes the VM as itself. Whatever IAM does, the backstop
        # holds: a worker whose removal is refused reports it in the bucket and powers its VM
        # off, and the group does not repair it (worker/cli.py, startup.sh, compute.py).
        group_role_id = Fn.replace(f"{name_prefix}_worker_leave_group", "-", "_")
        self.leave_group_role = ProjectIamCustomRole(
            self,
            "leave_group_role",
            project=project,
            role_id=group_role_id,
            title="CFlow worker: remove own VM from its group",
            description="deleteInstances on the worker group (no IAM condition can name a group)",
            permissions=LEAVE_GROUP_PERMISSIONS,
        )
        ProjectIamMember(
            self,
            "leaves_group",
            project=project,
            role=self.leave_group_role.name,
            member=member,
        )
