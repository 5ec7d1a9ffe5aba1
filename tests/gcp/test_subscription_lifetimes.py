"""Subscriptions the runner makes expire only after the messages they keep: an expiration
period no longer than the retention would drop a subscription while it still holds messages
(and the service may refuse it). On the Pub/Sub emulator, which stores both as given."""

from __future__ import annotations

from datetime import timedelta

import google.cloud.pubsub_v1 as pubsub_v1
import pytest

from runner.backends.gcp.events import RunSubscriptions
from tests.emulators import Deployment
from worker.backends.gcp.gcs import GcsStore

pytestmark = pytest.mark.emulator


def test_a_runs_events_subscription_outlives_the_events_it_keeps(deployment: Deployment) -> None:
    subscriber = pubsub_v1.SubscriberClient()
    per_run = RunSubscriptions(
        project=deployment.project,
        events_topic=deployment.events_topic,
        events_subscription=deployment.events_subscription,
        store=GcsStore(deployment.bucket),
        subscriber=subscriber,
    )
    try:
        bus = per_run.open("r-lifetimes")
        sub = subscriber.get_subscription(subscription=bus.path)
        ttl, retention = sub.expiration_policy.ttl, sub.message_retention_duration
        assert retention == timedelta(days=1)  # a watcher that re-attaches within a day
        assert ttl > retention and ttl >= timedelta(days=1)  # the service's minimum TTL
        bus.end()
    finally:
        subscriber.close()
