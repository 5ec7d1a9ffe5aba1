"""The runs' events subscriptions on the Pub/Sub emulator: they expire only after the messages
they keep (an expiration period no longer than the retention would drop a subscription while it
still holds messages, and the service may refuse it), and a detached submit leaves them to the
watch."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import google.cloud.pubsub_v1 as pubsub_v1
import pytest

from runner.backends.gcp.events import RunSubscriptions
from tests.e2e.conftest import make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.test_gcp_e2e import _cloud
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import Event, EventKind

pytestmark = pytest.mark.emulator


def _per_run(deployment: Deployment, subscriber: pubsub_v1.SubscriberClient) -> RunSubscriptions:
    return RunSubscriptions(
        project=deployment.project,
        events_topic=deployment.events_topic,
        events_subscription=deployment.events_subscription,
        store=GcsStore(deployment.bucket),
        subscriber=subscriber,
    )


def test_a_runs_events_subscription_outlives_the_events_it_keeps(deployment: Deployment) -> None:
    subscriber = pubsub_v1.SubscriberClient()
    per_run = _per_run(deployment, subscriber)
    try:
        bus = per_run.open("r-lifetimes")
        sub = subscriber.get_subscription(subscription=bus.path)
        ttl, retention = sub.expiration_policy.ttl, sub.message_retention_duration
        assert retention == timedelta(days=1)  # a watcher that re-attaches within a day
        assert ttl > retention and ttl >= timedelta(days=1)  # the service's minimum TTL
        bus.end()
    finally:
        subscriber.close()


def test_a_detached_submit_leaves_every_event_of_its_run_to_the_watch(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    """A detached submit starts the workers without listening: the run's events wait in its
    subscription for the `runner watch` that follows. One that took them would lose them for
    the watch; and on the emulator a stream opened by a process that then ends is handed a
    share of every later event, each waiting there out its lease (a retry after a halt then
    heard a worker's idle word a minute late, and held the VM that long)."""
    cloud = _cloud(deployment, fake_compute, tmp_path)
    task = make_task(tmp_path / "task", "def run(shard):\n    return None\n")
    r = cloud("submit", str(task), "--shards", "2", "--workers", "1", "--detach")
    assert r.code == 0, r.stderr
    subscriber = pubsub_v1.SubscriberClient()
    publisher = pubsub_v1.PublisherClient()
    per_run = _per_run(deployment, subscriber)
    topic = publisher.topic_path(deployment.project, deployment.events_topic)
    probes = {f"probe-{i}" for i in range(10)}
    for worker in sorted(probes):
        event = Event(kind=EventKind.IDLE.value, worker=worker, at=time.time())
        publisher.publish(topic, event.to_json(), kind=event.kind, worker=worker).result()
    heard: set[str] = set()

    def all_heard() -> bool:
        response = subscriber.pull(subscription=per_run.name(r.run_id), max_messages=100)
        heard.update(m.message.attributes["worker"] for m in response.received_messages)
        return probes <= heard

    try:  # well within the subscription's ack deadline (30 s): none is left leased elsewhere
        wait_for(all_heard, 10, "every probe event in the run's subscription")
    finally:
        subscriber.close()
