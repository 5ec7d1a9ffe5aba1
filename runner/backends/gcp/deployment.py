"""The runner's Google Cloud deployment: Pub/Sub, the bucket, the instance group, input staging.

Everything is named by the deployment outputs (see :mod:`runner.config`). Credentials are
Application Default Credentials; the emulators' ``*_EMULATOR_HOST`` variables and
``CFLOW_COMPUTE_ENDPOINT`` point the clients at local stand-ins.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import google.auth.exceptions
import google.cloud.pubsub_v1 as pubsub_v1

from runner.backends.factory import Deployment
from runner.backends.gcp.events import RunSubscriptions
from runner.backends.gcp.fleet import GceFleet
from runner.backends.gcp.wheels import stage_task
from runner.config import Config
from runner.engine.fleet import Fleet
from runner.engine.shards import RemoteLister
from worker.backends.base import Backends
from worker.backends.gcp.gcs import GcsStore, file_crc32c, make_client
from worker.backends.gcp.pubsub import PubSubEvents, PubSubQueue
from worker.backends.gcp.vm import agent_log_key
from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import BackendError, ConfigError, InputError, NotFound
from worker.protocol import Layout, Shard, slug

log = logging.getLogger("cflow.runner")

DEFAULT_WORKERS = 10  # VMs a run may use when --workers is not given
POLL_SECONDS = 2.0  # the watch loop lists the group once per poll: an API call each
UPLOAD_THREADS = 8  # local inputs uploaded at once
UPLOADS_IN_FLIGHT = 64  # uploads queued or running before staging waits for them


class GcsLister(RemoteLister):
    """Expands ``gs://bucket/glob`` into object URIs, listing page by page."""

    def __init__(self, store: GcsStore):
        self.store = store

    def __call__(self, pattern: str) -> Iterator[str]:
        return self.store.glob(pattern)


class InputStager:
    """Uploads a run's local inputs to ``runs/<run>/inputs/`` in parallel.

    Calling it returns the shard with its ``gs://`` input at once and uploads in the background
    (at most ``UPLOADS_IN_FLIGHT`` pending); :meth:`wait` blocks until every upload is stored.
    An object already there with the same size and CRC32C is not uploaded again.
    """

    def __init__(self, store: GcsStore, *, threads: int = UPLOAD_THREADS):
        self.store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stage")
        self._slots = threading.BoundedSemaphore(UPLOADS_IN_FLIGHT)
        self._lock = threading.Lock()
        self._futures: list[Future[bool]] = []
        self._existing: dict[str, dict[str, tuple[int, str]]] = {}  # run -> key -> (size, crc)
        self.uploaded = 0
        self.skipped = 0

    def __call__(self, run_id: str, shard: Shard) -> Shard:
        if not shard.input or "://" in shard.input:
            return shard
        path = Path(shard.input)
        if not path.is_file():
            raise InputError(f"input {path} is not a file", run_id=run_id, shard_id=shard.id)
        key = f"{Layout.uploads(run_id)}{shard.id}/{slug(path.name, 120) or 'input'}"
        with self._lock:
            if run_id not in self._existing:  # one listing per run, never one per input
                self._existing[run_id] = self.store.checksums(Layout.uploads(run_id))
            existing = self._existing[run_id].get(key)
        self._slots.acquire()
        future = self._pool.submit(self._upload, key, path, existing)
        future.add_done_callback(lambda _: self._slots.release())
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.exception()]
            self._futures.append(future)
        return Shard(id=shard.id, index=shard.index, input=self.store.url(key), params=shard.params)

    def _upload(self, key: str, path: Path, existing: tuple[int, str] | None) -> bool:
        if existing is not None and existing == (path.stat().st_size, file_crc32c(path)):
            with self._lock:
                self.skipped += 1
            return False
        self.store.put_file(key, path)
        with self._lock:
            self.uploaded += 1
        return True

    def wait(self) -> None:
        """Block until every upload so far is stored; raises the first failure."""
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            exc = future.exception()
            if exc is not None:
                raise BackendError(f"could not upload an input: {exc}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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
    stager = InputStager(store)
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
    )
    return deployment


def prepare_task(task_dir: Path, work_dir: Path) -> Path:
    """The task folder to bundle for the VMs: its requirements resolved into wheels it carries
    (:func:`runner.backends.gcp.wheels.stage_task`), so no VM needs a package index to install
    them."""
    return stage_task(task_dir, work_dir)


def agent_log(store: GcsStore, worker: str) -> bytes:
    """A worker VM's own agent log (``fleet/<vm>/agent.log``), kept after the VM is gone.

    Raises:
        NotFound: that worker never uploaded one.
    """
    try:
        return store.get(agent_log_key(worker))
    except NotFound:
        raise NotFound(f"no agent log for worker {worker} in gs://{store.bucket_name}") from None


def agent_logs(store: GcsStore) -> list[str]:
    """Workers that left an agent log, by name."""
    return sorted(
        key.split("/")[1]
        for key in store.list("fleet/", suffix="/agent.log")
        if key.count("/") == 2
    )
