"""Open the worker's Google Cloud backends: Pub/Sub and Cloud Storage.

``open_gcp`` wires them from plain settings (flags or ``CFLOW_*`` variables, which the VM
bootstrap fills from instance metadata). The clients honour ``PUBSUB_EMULATOR_HOST`` and
``STORAGE_EMULATOR_HOST``. Credentials are Application Default Credentials: the VM's service
account, never a key file.
"""

from __future__ import annotations

from worker import defaults
from worker.backends.base import Backends
from worker.backends.gcp.gcs import GcsStore, make_client
from worker.backends.gcp.pubsub import PubSubQueue
from worker.backends.gcp.pubsub_events import PubSubEvents
from worker.errors import ConfigError


def _require(**settings: str | None) -> None:
    missing = [name for name, value in settings.items() if not value]
    if missing:
        flags = ", ".join(
            f"--{n.replace('_', '-')} (CFLOW_{n.upper()})"
            for n in missing  # the flag and variable names of worker/cli.py
        )
        raise ConfigError(f"the gcp backend needs {flags}")


def open_gcp(
    *,
    project: str | None,
    bucket: str | None,
    subscription: str | None,
    events_topic: str | None,
    slots: int = defaults.SLOTS,
    max_lease_seconds: float | None = None,
    work_topic: str | None = None,
    lease_seconds: float = defaults.LEASE_SECONDS,
) -> Backends:
    """The worker's queue (the work subscription), store (the bucket) and event publisher.

    Args:
        project: project of bare topic and subscription names.
        bucket: the deployment's bucket (bare name).
        subscription: the work subscription to pull from.
        events_topic: where progress events go.
        slots: shards run at once; sizes the HTTP connection pool.
        max_lease_seconds: how long a held message is renewed without agent heartbeats.
        work_topic: where a failed shard is re-queued; looked up from the subscription if absent.
        lease_seconds: the ack deadline kept on held messages (a dead worker's shards come
            back after at most this long).

    Raises:
        ConfigError: a required setting is missing.
    """
    _require(project=project, bucket=bucket, subscription=subscription, events_topic=events_topic)
    assert project and bucket and subscription and events_topic
    store = GcsStore(bucket, client=make_client(project, pool_size=max(slots * 3, 10)))
    queue = PubSubQueue(
        project=project,
        topic=work_topic,
        subscription=subscription,
        lease_seconds=lease_seconds,
        max_lease_seconds=max_lease_seconds,
    )
    events = PubSubEvents(project=project, topic=events_topic)
    return Backends(queue=queue, store=store, events=events)
