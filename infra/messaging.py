"""Pub/Sub: the work queue the workers pull, the events the runner watches, the dead letters."""

from __future__ import annotations

from cdktf import TerraformProvider, TerraformProviderGeneratorMetadata, TerraformResource
from cdktf_cdktf_provider_google.pubsub_subscription import (
    PubsubSubscription,
    PubsubSubscriptionDeadLetterPolicy,
    PubsubSubscriptionExpirationPolicy,
    PubsubSubscriptionRetryPolicy,
)
from cdktf_cdktf_provider_google.pubsub_subscription_iam_member import PubsubSubscriptionIamMember
from cdktf_cdktf_provider_google.pubsub_topic import PubsubTopic
from cdktf_cdktf_provider_google.pubsub_topic_iam_member import PubsubTopicIamMember
from constructs import Construct

WORK_ACK_DEADLINE = 60  # seconds; the worker's client extends the lease while a task runs
EVENTS_ACK_DEADLINE = 30  # seconds
# 31 days, Pub/Sub's maximum ("Maximum value = 31 days",
# https://cloud.google.com/pubsub/docs/subscription-properties): a run's queued shards wait that
# long for capacity or quota before Pub/Sub drops them.
WORK_RETENTION = "2678400s"
DEAD_LETTER_RETENTION = "604800s"  # 7 days: the runner reads dead letters while it watches
# The shared events subscription is read by nobody on Google Cloud (each run's watcher reads a
# subscription of its own, runner/backends/gcp/events.py): it exists to name those and for
# `runner doctor`. Pub/Sub's minimum retention keeps its unread backlog to the last 10 minutes of
# events instead of a week of every worker's heartbeats.
EVENTS_RETENTION = "600s"
RETRY_MIN_BACKOFF = "10s"  # a nacked shard (preempted, failed) is offered again after this...
RETRY_MAX_BACKOFF = "300s"  # ...growing to this on repeated nacks
NEVER_EXPIRE = PubsubSubscriptionExpirationPolicy(ttl="")  # default: deleted after 31 idle days
BETA = TerraformProviderGeneratorMetadata(provider_name="google-beta")


class Messaging(Construct):
    """Topics and subscriptions, with the dead-letter rights Pub/Sub's own agent needs.

    Attributes:
        work_topic, work_subscription: one message per shard, pulled by the workers.
        events_topic, events_subscription: worker events (started, succeeded, ...) for the runner;
            each run's watcher reads a subscription of its own, named after this one.
        dead_letter_topic, dead_letter_subscription: work messages delivered too many times.
    """

    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        name_prefix: str,
        project: str,
        max_delivery_attempts: float,
        beta: TerraformProvider,
    ) -> None:
        super().__init__(scope, id)
        self.dead_letter_topic = PubsubTopic(self, "dead_letter", name=f"{name_prefix}-dead-letter")
        self.dead_letter_subscription = PubsubSubscription(
            self,
            "dead_letter_sub",
            name=f"{name_prefix}-dead-letter",
            topic=self.dead_letter_topic.id,
            message_retention_duration=DEAD_LETTER_RETENTION,
            expiration_policy=NEVER_EXPIRE,
        )
        self.work_topic = PubsubTopic(self, "work", name=f"{name_prefix}-work")
        self.work_subscription = PubsubSubscription(
            self,
            "work_sub",
            name=f"{name_prefix}-work",
            topic=self.work_topic.id,
            ack_deadline_seconds=WORK_ACK_DEADLINE,
            message_retention_duration=WORK_RETENTION,
            expiration_policy=NEVER_EXPIRE,
            retry_policy=PubsubSubscriptionRetryPolicy(
                minimum_backoff=RETRY_MIN_BACKOFF, maximum_backoff=RETRY_MAX_BACKOFF
            ),
            dead_letter_policy=PubsubSubscriptionDeadLetterPolicy(
                dead_letter_topic=self.dead_letter_topic.id,
                max_delivery_attempts=max_delivery_attempts,
            ),
        )
        self.events_topic = PubsubTopic(self, "events", name=f"{name_prefix}-events")
        self.events_subscription = PubsubSubscription(
            self,
            "events_sub",
            name=f"{name_prefix}-events",
            topic=self.events_topic.id,
            ack_deadline_seconds=EVENTS_ACK_DEADLINE,
            message_retention_duration=EVENTS_RETENTION,
            expiration_policy=NEVER_EXPIRE,
        )

        # Dead lettering is done by Pub/Sub's service agent: it must be able to publish to the
        # dead-letter topic and to acknowledge the message on the work subscription. On a fresh
        # project that agent may not exist yet, and a binding to a missing account fails the
        # deploy: declaring it (google_project_service_identity, a google-beta resource, made
        # here with the plain resource class since only the GA provider is prebuilt) creates it
        # if needed, and the bindings use the email it returns.
        self.pubsub_agent = TerraformResource(
            self,
            "pubsub_agent",
            terraform_resource_type="google_project_service_identity",
            terraform_generator_metadata=BETA,
            provider=beta,
        )
        self.pubsub_agent.add_override("project", project)
        self.pubsub_agent.add_override("service", "pubsub.googleapis.com")
        agent = f"serviceAccount:{self.pubsub_agent.get_string_attribute('email')}"
        PubsubTopicIamMember(
            self,
            "agent_publishes_dead_letters",
            topic=self.dead_letter_topic.name,
            role="roles/pubsub.publisher",
            member=agent,
        )
        PubsubSubscriptionIamMember(
            self,
            "agent_acks_work",
            subscription=self.work_subscription.name,
            role="roles/pubsub.subscriber",
            member=agent,
        )
