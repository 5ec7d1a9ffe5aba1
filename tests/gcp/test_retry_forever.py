"""Cloud Storage, Pub/Sub and Compute calls outlive an outage of any length.

A watch and a worker make their Cloud Storage and Pub/Sub calls through the services' retry
policies with no deadline: an outage longer than the client libraries' 600 s retry deadline is
waited out, said once when it starts and once when it ends, and the call then goes on. The
outage is real failing calls (the fault proxies in front of the emulators answer every call with
a transient error); only its length is virtual: the pauses between tries go to a clock that
moves at once and ends the outage when it has lasted ``OUTAGE`` seconds.

Also here: every page of a Compute listing goes through the retry (the client library's pager
asks for the pages after the first with no retry at all), and a run's ``run.json``, written when
the run is made and again when its shards are published, is never written twice within a second
(Cloud Storage takes one write a second to one object name, and refuses more with 429).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pytest
from google.api_core.client_options import ClientOptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import compute_v1

from runner.backends.gcp.events import RunSubscriptions
from runner.engine import runs
from tests.emulators import PROJECT, Deployment
from tests.gcp.conftest import MakeCompute, MakeProxies
from tests.gcp.fake_compute import paper
from tests.gcp.faults import FaultPlan
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.pubsub import PubSubQueue
from worker.backends.gcp.retry import COMPUTE, LIBRARY_TIMEOUT, Outage
from worker.backends.gcp.retry_compute import Retried
from worker.errors import BackendError
from worker.protocol import Layout, RunOptions, Shard, WorkMessage

OUTAGE = 700.0  # seconds: longer than the client libraries' retry deadline
ZONE = "us-central1-a"
GROUP = "cflow-workers"


class OutageClock:
    """Virtual time for the pauses between tries: ``sleep`` moves it at once, and once the
    outage has lasted ``lasts`` seconds the plan stops failing calls."""

    def __init__(self, plan: FaultPlan, lasts: float = OUTAGE):
        self.plan = plan
        self.now = 1_800_000_000.0
        self.ends = self.now + lasts
        self.slept = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self.now

    def monotonic(self) -> float:
        return self.time()

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += max(seconds, 0.0)
            self.slept += max(seconds, 0.0)
            if self.now >= self.ends:
                self.plan.rate = 0.0


def _said(caplog: pytest.LogCaptureFixture, service: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "cflow.retry" and r.getMessage().startswith(service)
    ]


def test_store_reads_and_writes_wait_out_a_long_outage_and_say_it_once(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    plan = FaultPlan(0.0, seed=3, kinds=["503", "500"])
    proxies = fault_proxies(plan)
    clock = OutageClock(plan)
    said: list[str] = []
    store = GcsStore(
        deployment.bucket, clock=clock, outage=Outage("Cloud Storage", said.append, clock)
    )
    key = Layout.manifest("r-outage")
    store.put(key, b"1")
    plan.rate = 1.0  # every call fails from now on, until the outage has lasted OUTAGE seconds
    assert store.get(key) == b"1"
    assert clock.slept >= OUTAGE > LIBRARY_TIMEOUT  # past the libraries' deadline, not given up
    assert plan.total() > 10  # real failed calls, not one long pause
    assert len(said) == 2, said  # said once when it started, once when it ended
    assert said[0].startswith("Cloud Storage answered 50") and "waiting for it" in said[0]
    assert f"gs://{deployment.bucket}/{key}" in said[0]
    assert said[1].startswith("Cloud Storage answers again, after ")
    # A read-change-write and a paged listing through a second outage, every page retried.
    for i in range(5):
        store.put(f"runs/r-outage/shards/s{i}/result.json", b"{}")
    store.page_size = 2
    clock.ends = clock.now + OUTAGE
    plan.rate = 1.0
    assert store.update(key, lambda old: old + b"2") == b"12"
    plan.rate, clock.ends = 0.5, clock.now + OUTAGE  # every other call of the listing fails
    listed = list(store.list("runs/r-outage/shards/", suffix="/result.json"))
    assert listed == [f"runs/r-outage/shards/s{i}/result.json" for i in range(5)]
    assert store.get(key) == b"12" and proxies.gcs.refused_writes == 0
    # A write on a worker's way out (its log) gives up instead, not to keep an idle VM going.
    plan.rate, clock.ends, started = 1.0, clock.now + OUTAGE, clock.now
    with pytest.raises(BackendError, match=r"could not write gs://.*/fleet/vm-1/agent.log"):
        store.bounded(60.0).put("fleet/vm-1/agent.log", b"log")
    assert clock.now - started <= 60.0


def test_publish_and_ack_wait_out_a_long_pubsub_outage(
    deployment: Deployment, fault_proxies: MakeProxies, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="cflow.retry")
    plan = FaultPlan(0.0, seed=5, kinds=["UNAVAILABLE", "RESOURCE_EXHAUSTED"])
    fault_proxies(plan)
    clock = OutageClock(plan)
    queue = PubSubQueue(
        project=deployment.project,
        topic=deployment.work_topic,
        subscription=deployment.work_subscription,
        clock=clock,
    )
    try:
        messages = [WorkMessage(run_id="r-ps", shard={"id": f"s{i}", "index": i}) for i in range(3)]
        plan.rate = 1.0
        assert queue.publish(messages) == 3  # the runner's publish: waits, then goes on
        assert clock.slept >= OUTAGE and plan.total() > 10
        said = _said(caplog, "Pub/Sub")
        assert len(said) == 2, said
        assert "to publish 3 messages" in said[0] and "waiting for it" in said[0]
        got: dict[str, Any] = {}
        while len(got) < 3:  # a message published twice (its answer lost) is harmless
            for delivery in queue.receive(3, 5.0):
                got.setdefault(delivery.message.shard["id"], delivery)
        clock.ends, plan.rate = clock.now + OUTAGE, 1.0
        for delivery in got.values():
            queue.ack(delivery)  # a worker's ack after its commit: waits, then goes on
        assert clock.now >= clock.ends
        assert len(_said(caplog, "Pub/Sub")) == 4
    finally:
        queue.close()


def test_a_watch_opening_its_events_subscription_waits_out_an_outage(
    deployment: Deployment, fault_proxies: MakeProxies
) -> None:
    import google.cloud.pubsub_v1 as pubsub_v1

    plan = FaultPlan(0.0, seed=7, kinds=["UNAVAILABLE"])
    fault_proxies(plan)
    clock = OutageClock(plan)
    subscriber = pubsub_v1.SubscriberClient()
    subscriptions = RunSubscriptions(
        project=deployment.project,
        events_topic=deployment.events_topic,
        events_subscription=deployment.events_subscription,
        store=GcsStore(deployment.bucket),
        subscriber=subscriber,
        clock=clock,
    )
    plan.rate = 1.0
    bus = subscriptions.open("r-events")
    assert clock.slept >= OUTAGE
    with plan.suspended():
        path = subscriptions.name("r-events")
        assert subscriber.get_subscription(subscription=path).name == path
    bus.end()
    subscriber.close()


def test_every_page_of_a_compute_listing_is_retried(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=paper, group=GROUP, zone=ZONE)
    options = ClientOptions(api_endpoint=fake.endpoint)
    client = compute_v1.InstanceGroupManagersClient(
        credentials=AnonymousCredentials(), client_options=options, transport="rest"
    )
    said: list[str] = []
    managers: Any = Retried(client, COMPUTE, say=said.append, clock=OutageClock(FaultPlan()))
    group = {"project": PROJECT, "zone": ZONE, "instance_group_manager": GROUP}
    managers.resize(request={**group, "size": 3})
    pages = managers.list_managed_instances(request={**group, "max_results": 1})
    first = next(iter(pages))  # the first page is asked for at once
    fake.fail_next("POST", r"/listManagedInstances$", 503)  # the second page's first try
    fake.fail_next("POST", r"/listManagedInstances$", 502)  # the third's
    rest = list(pages)
    names = [m.instance.rsplit("/", 1)[-1] for m in [first, *rest]]
    assert len(names) == 3 == len(set(names))
    assert len(said) == 2
    assert said[0].startswith("Compute answered 503 backendError to list_managed_instances")


def test_a_runs_manifest_is_never_written_twice_within_a_second(
    deployment: Deployment, fault_proxies: MakeProxies, tmp_path: Path
) -> None:
    proxies = fault_proxies(FaultPlan(0.0))
    store = GcsStore(deployment.bucket)
    queue = PubSubQueue(project=deployment.project, topic=deployment.work_topic)
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    try:
        manifest = runs.create_run(
            store=store,
            queue=queue,
            task_dir=task,
            shards=(Shard(id=f"s{i}", index=i) for i in range(5)),
            options=RunOptions(),
        )
    finally:
        queue.close()
    assert manifest.published == manifest.shard_count == 5 and not manifest.publishing
    # Made, then recorded as published: the second write waited out the first one's second
    # instead of being refused with 429 (and retried).
    assert proxies.gcs.refused_writes == 0
    assert runs.load_manifest(store, manifest.run_id).published == 5
