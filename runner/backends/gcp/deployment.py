"""The runner's Google Cloud deployment: Pub/Sub, the bucket, the instance group, input staging.

Everything is named by the deployment outputs (see :mod:`runner.config`). Credentials are
Application Default Credentials; the emulators' ``*_EMULATOR_HOST`` variables and
``CFLOW_COMPUTE_ENDPOINT`` point the clients at local stand-ins.
"""

from __future__ import annotations

import logging

import google.auth.exceptions
import google.cloud.pubsub_v1 as pubsub_v1

from runner.backends.gcp.combine import BucketCombiner
from runner.backends.gcp.events import RunSubscriptions
from runner.backends.gcp.staging import BucketStager, GcsLister, prepare_task
from runner.config import Config
from runner.engine.deployment import Deployment
from runner.engine.fleet import Fleet
from worker.backends.base import Backends
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.backends.gcp.pubsub import PubSubQueue
from worker.backends.gcp.pubsub_events import PubSubEvents
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import ConfigError

log = logging.getLogger("cflow.runner")

DEFAULT_WORKERS = 10  # VMs a run may use when --workers is not given
POLL_SECONDS = 2.0  # the watch loop lists the group once per poll: an API call each


def open_gcp_deployment(config: Config, *, clock: Clock = SYSTEM_CLOCK) -> Deployment:
    """The deployment's queue, store, events, fleet factory, gs:// lister and input stager."""
    project, bucket = config.project, config.bucket
    if not project or not bucket or not config.group:
        raise ConfigError("the Google Cloud backend needs a project, a bucket and a group")
    try:
        store = GcsStore(bucket, client=make_client(project))
        subscriber = pubsub_v1.SubscriberClient()
    except google.auth.exceptions.DefaultCredentialsError:
        raise ConfigError(
            "no Google Cloud credentials; run `gcloud auth application-default login`"
            " (or use --local)"
        ) from None
    queue = PubSubQueue(
        project=project,
        topic=config.work_topic,
        dead_letter_subscription=config.dead_letter_subscription,
        subscriber=subscriber,
        clock=clock,
    )
    events = PubSubEvents(
        project=project, subscription=config.events_subscription, subscriber=subscriber
    )
    stager = BucketStager(store)
    queue.before_publish = stager.wait  # no shard goes out before its input is stored
    group = config.group
    per_run = RunSubscriptions(
        project=project,
        events_topic=config.events_topic,
        events_subscription=config.events_subscription,
        store=store,
        subscriber=subscriber,
    )

    def make_fleet(slots: int, idle_timeout: float | None) -> Fleet:
        # Slots and the idle timeout of VMs are set at deploy time, in the instance template.
        # The Compute client takes seconds to load: only the commands that look at the group
        # (submit, watch, cancel; status when it must tell a lost shard) pay for it.
        from runner.backends.gcp.fleet import GceFleet

        return GceFleet(
            project=project,
            group=group,
            zone=config.zone,
            region=config.region,
            clock=clock,
            store=store,  # VMs report failed boots and failed self-removal there
        )

    deployment = Deployment(
        config=config,
        backends=Backends(queue=queue, store=store, events=events),
        make_fleet=make_fleet,
        lister=GcsLister(store),
        stage_input=stager,
        default_workers=DEFAULT_WORKERS,
        poll_seconds=POLL_SECONDS,
        closers=[stager.close, per_run.close, subscriber.close],
        # Concurrent runs keep their events apart: each watcher reads its own subscription.
        open_run_events=lambda run_id, since: per_run.open(run_id),
        prepare_task=prepare_task,  # task requirements as wheels, resolved at submit
        combiner=BucketCombiner(),  # composed in the bucket; big header-less copies on the VMs
    )
    return deployment
