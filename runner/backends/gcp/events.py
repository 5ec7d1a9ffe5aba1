"""One events subscription per run, so concurrent runs on one deployment keep their events apart.

With one shared events subscription, two watchers split the events between them: each sees
about half of its own run's events. Here every run has its own subscription on the deployment's
events topic, so each watcher receives a full copy of the event stream.

It is deliberately *not* filtered to the run's own events (a Pub/Sub filter such as
``attributes.run_id = "R" OR NOT attributes:run_id`` would be possible: workers set ``run_id``
only on events that belong to a run). A watcher must see the other runs' ``started`` and
finishing events too: workers are shared by every run of a deployment, and that is how a
watcher knows a worker is busy with another run's shard and must not be scaled away when its
own run drains (:class:`runner.engine.watch.Watcher` tracks them as ``elsewhere``). Filtering them
out would bring back the very bug this prevents: one run's scale-down deleting another run's busy
workers.

Pub/Sub delivers to a subscription only what is published after it exists, so the subscription
is created before any shard of the run is published (a worker already up takes one at once and
says so; :func:`runner.finish.listen_first`), made again before a retry publishes its round
(the run's subscription went when it ended), and reused by a later ``runner watch``. It is
deleted when its bus is closed after the run ended (manifest no longer ``active``); one left
behind by a killed runner is deleted by the next :meth:`RunSubscriptions.open` once its run is
over, and Pub/Sub itself expires any subscription unused for ``EXPIRY`` (two
days: longer than the events it keeps, ``RETENTION``).
"""

from __future__ import annotations

import logging
import re
import time

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc

from worker.backends.gcp.pubsub_api import resource_path
from worker.backends.gcp.pubsub_events import PubSubEvents
from worker.backends.gcp.retry import PUBSUB, PUBSUB_RETRY, Outage, retrying
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, ConfigError, Unusable
from worker.protocol import Event, Layout, Manifest, RunState
from worker.store import Store

log = logging.getLogger("cflow.runner")

RETENTION = "86400s"  # events older than this are of no use to a watcher
# Pub/Sub deletes a per-run subscription unused this long: longer than the retention (an
# expiration shorter than or equal to the retention is refused or pointless), and at least the
# service's minimum TTL, one day.
EXPIRY = "172800s"
ACK_DEADLINE = 30  # seconds
NAME_SUFFIX = "-run-"  # <events subscription>-run-<run id>
LABEL = "cflow_run"  # label on every per-run subscription; its value is the run id (lowercased)
CREATED_LABEL = "cflow_created"  # unix time the subscription was made
# A subscription may be made before its run's manifest is written: one without a manifest is
# stale only after this long.
GRACE_SECONDS = 3600.0
MAX_NAME = 255  # Pub/Sub's limit on a subscription id


class RunSubscriptions:
    """Creates, opens and cleans up the per-run events subscriptions of one deployment.

    Args:
        project: the deployment's project.
        events_topic: the topic the workers publish events to.
        events_subscription: the deployment's shared events subscription; per-run ones are
            named after it (``<name>-run-<run id>``).
        store: the bucket, to tell whether a run is over.
        clock: the pauses between tries of a call Pub/Sub answered with a transient error.
    """

    def __init__(
        self,
        *,
        project: str,
        events_topic: str | None,
        events_subscription: str | None,
        store: Store,
        subscriber: pubsub_v1.SubscriberClient,
        clock: Clock = SYSTEM_CLOCK,
    ):
        if not events_topic or not events_subscription:
            raise ConfigError("the deployment outputs name no events topic or subscription")
        self.project = project
        self.topic = resource_path(project, "topics", events_topic)
        self.base = events_subscription.rsplit("/", 1)[-1]
        self.store = store
        self.subscriber = subscriber
        self.clock = clock  # the retries' pauses
        self.outage = Outage("Pub/Sub", clock=clock)
        self._buses: list[RunEvents] = []

    def name(self, run_id: str) -> str:
        """The full path of ``run_id``'s subscription."""
        sub_id = f"{self.base}{NAME_SUFFIX}{run_id}"
        if len(sub_id) > MAX_NAME or not re.fullmatch(r"[A-Za-z][\w.~+%-]*", sub_id):
            raise ConfigError(f"run id {run_id!r} does not make a valid subscription name")
        return resource_path(self.project, "subscriptions", sub_id)

    def open(self, run_id: str) -> RunEvents:
        """The run's event bus, creating its subscription if it does not exist yet."""
        path = self.name(run_id)
        request = {
            "name": path,
            "topic": self.topic,
            "ack_deadline_seconds": ACK_DEADLINE,
            "message_retention_duration": RETENTION,
            "expiration_policy": {"ttl": EXPIRY},
            "labels": {LABEL: _label_value(run_id), CREATED_LABEL: str(int(time.time()))},
        }
        try:  # a watch starting in a Pub/Sub outage waits it out (said once) and goes on
            retrying(
                PUBSUB,
                lambda: self.subscriber.create_subscription(request=request, retry=None),
                what=f"create the events subscription of run {run_id}",
                clock=self.clock,
                outage=self.outage,
            )
            log.info("created events subscription %s", path)
        except gexc.AlreadyExists:
            pass  # a re-attached watch (or a retried create): the run's events waited there
        except gexc.GoogleAPICallError as exc:
            raise BackendError(
                f"could not create the events subscription of run {run_id}: {exc.message}"
            ) from None
        self.cleanup(keep=run_id)
        bus = RunEvents(self, run_id, path)
        self._buses.append(bus)
        return bus

    def existing(self) -> dict[str, str]:
        """Per-run subscriptions on the events topic: run id -> subscription path."""
        prefix = f"{self.base}{NAME_SUFFIX}"
        found = {}
        try:
            with pubsub_v1.PublisherClient() as publisher:
                names = list(publisher.list_topic_subscriptions(topic=self.topic))
        except (gexc.GoogleAPICallError, TypeError):
            return {}
        for path in names:
            sub_id = path.rsplit("/", 1)[-1]
            if sub_id.startswith(prefix):
                found[sub_id[len(prefix) :]] = path
        return found

    def cleanup(self, keep: str | None = None) -> list[str]:
        """Delete the subscriptions of runs that are over (or gone); the run ids deleted."""
        deleted = []
        for run_id, path in self.existing().items():
            if run_id != keep and self._stale(run_id, path) and self.delete(path):
                deleted.append(run_id)
        return deleted

    def _stale(self, run_id: str, path: str) -> bool:
        state = self.state(run_id)
        if state == RunState.ACTIVE.value:
            return False
        if state is not None:
            return True
        try:  # no manifest (yet?): only once the subscription is past its grace period
            labels = self.subscriber.get_subscription(subscription=path).labels
            created = float(labels.get(CREATED_LABEL, "0"))
        except (gexc.GoogleAPICallError, ValueError):
            return False
        return time.time() - created > GRACE_SECONDS

    def state(self, run_id: str) -> str | None:
        """The run's manifest state, or None when there is no readable manifest."""
        try:
            return Manifest.from_json(self.store.get(Layout.manifest(run_id))).state
        except Exception:
            return None

    def is_active(self, run_id: str) -> bool:
        return self.state(run_id) == RunState.ACTIVE.value

    def delete(self, path: str) -> bool:
        try:
            self.subscriber.delete_subscription(subscription=path, retry=PUBSUB_RETRY)
        except gexc.NotFound:
            return False
        except gexc.GoogleAPICallError as exc:
            log.warning("could not delete events subscription %s: %s", path, exc)
            return False
        log.info("deleted events subscription %s", path)
        return True

    def close(self) -> None:
        for bus in list(self._buses):
            bus.close()


class RunEvents(PubSubEvents):
    """One run's events; closing it after the run ended deletes its subscription."""

    def __init__(self, owner: RunSubscriptions, run_id: str, path: str):
        super().__init__(project=owner.project, subscription=path, subscriber=owner.subscriber)
        self.owner = owner
        self.run_id = run_id
        self.path = path
        self._ended = False
        self._closed = False
        self.gone = False  # the subscription was deleted after the run ended

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        """The run's events; none once the run is over and its subscription is gone."""
        if self.gone:
            return []
        try:
            return super().pull(max_events, timeout)
        except Unusable:
            # Another runner's open() deletes the subscriptions of runs that are over, maybe
            # while this runner still drains the run's workers: nothing more comes for it then.
            if self.owner.state(self.run_id) in (None, RunState.ACTIVE.value):
                raise
            log.info("run %s is over and its events subscription is gone", self.run_id)
            self.gone = True
            return []

    def end(self) -> None:
        """The run is over: delete its subscription now, whatever the manifest says."""
        self._ended = True
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        super().close()
        # A detached runner (Ctrl-C) keeps the subscription for `runner watch`; so does a bus
        # closed before its run's manifest exists.
        state = self.owner.state(self.run_id)
        if self._ended or (state is not None and state != RunState.ACTIVE.value):
            self.owner.delete(self.path)
        if self in self.owner._buses:
            self.owner._buses.remove(self)


def _label_value(run_id: str) -> str:
    """Label values: lowercase letters, digits, ``_`` and ``-``, at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "_", run_id.lower())[:63]
