"""Two runs at once on one deployment: each has its own events subscription, both finish once.

Real workers (``python -m worker --backend gcp``) in a fake group on the emulators, and two
runners' watchers, each with its own fleet client, as two ``runner submit`` would have.
"""

from __future__ import annotations

import threading
from pathlib import Path

import google.cloud.pubsub_v1 as pubsub_v1
import pytest

from runner.backends.gcp.events import RunSubscriptions
from runner.backends.gcp.fleet import GceFleet
from runner.engine import runs
from runner.engine.reports import shard_reports
from runner.engine.shards import from_count
from runner.engine.watch import Snapshot, Watcher
from tests.e2e.conftest import make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_spawner
from tests.gcp.fake_compute import FakeCompute
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.pubsub import PubSubQueue
from worker.protocol import Event, RunOptions, RunState

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

ZONE = "us-central1-a"
GROUP = "cflow-workers"
SLOW = "import time\n\ndef run(shard):\n    time.sleep(2)\n"
QUICK = "def run(shard):\n    pass\n"


def _group(d: Deployment, fake_compute: MakeCompute, tmp_path: Path) -> FakeCompute:
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        d,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
        idle_timeout=120.0,  # only the runners scale the group down in this test
    )
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE)
    holder["endpoint"] = fake.endpoint
    return fake


def test_two_concurrent_runs_both_finish_once_without_disturbing_each_others_workers(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    fake = _group(deployment, fake_compute, tmp_path)
    store = GcsStore(deployment.bucket)
    queue = PubSubQueue(project=deployment.project, topic=deployment.work_topic)
    subscriber = pubsub_v1.SubscriberClient()
    per_run = RunSubscriptions(
        project=deployment.project,
        events_topic=deployment.events_topic,
        events_subscription=deployment.events_subscription,
        store=store,
        subscriber=subscriber,
    )
    watchers: list[Watcher] = []
    seen: dict[str, list[Event]] = {}
    for name, body, shards in (("slow", SLOW, 6), ("quick", QUICK, 6)):
        manifest = runs.create_run(
            store=store,
            queue=queue,
            task_dir=make_task(tmp_path / name, body),
            shards=from_count(shards),
            options=RunOptions(),
        )
        watchers.append(
            Watcher(
                manifest=manifest,
                store=store,
                queue=queue,
                events=per_run.open(manifest.run_id),
                fleet=GceFleet(project=deployment.project, group=GROUP, zone=ZONE),
                max_workers=2,
                reconcile_seconds=2.0,
                on_event=seen.setdefault(manifest.run_id, []).append,
            )
        )
    assert set(per_run.existing()) == {w.run_id for w in watchers}

    results: dict[str, Snapshot] = {}

    def watch(w: Watcher) -> None:
        results[w.run_id] = w.watch(poll_seconds=0.5)
        w.drain_fleet(timeout=60)

    threads = [threading.Thread(target=watch, args=(w,)) for w in watchers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    try:
        assert len(results) == 2, "both runs finished"
        for w in watchers:
            snapshot = results[w.run_id]
            assert snapshot.succeeded == w.manifest.shard_count and snapshot.failed == 0
            assert runs.committed(store, w.run_id) == {
                s.id for s in runs.iter_shards(store, w.run_id)
            }
            states = [a.state for r in shard_reports(store, w.run_id) for a in r.attempts]
            # Every shard ran once: no attempt was cut short by the other run's scale-down.
            assert states.count("succeeded") == w.manifest.shard_count, states
            assert "preempted" not in states
            # Its watcher saw every one of its own shards finish: no events taken by the other.
            own = {
                e.shard_id for e in seen[w.run_id] if e.run_id == w.run_id and e.kind == "succeeded"
            }
            assert len(own) == w.manifest.shard_count
        assert not fake.resized_down()
        wait_for(fake.is_empty, 60, "the group at zero")
    finally:
        for w in watchers:
            manifest = runs.load_manifest(store, w.run_id)
            runs.save_manifest(store, manifest.with_state(RunState.FINISHED))  # as submit does
            w.events.close()
            assert w.fleet is not None
            w.fleet.close()
        queue.close()
    assert per_run.existing() == {}, "each run's subscription is gone with its run"
    subscriber.close()


def test_stale_run_subscriptions_are_cleaned_up_by_the_next_run(
    deployment: Deployment, tmp_path: Path
) -> None:
    store = GcsStore(deployment.bucket)
    queue = PubSubQueue(project=deployment.project, topic=deployment.work_topic)
    subscriber = pubsub_v1.SubscriberClient()
    per_run = RunSubscriptions(
        project=deployment.project,
        events_topic=deployment.events_topic,
        events_subscription=deployment.events_subscription,
        store=store,
        subscriber=subscriber,
    )
    try:
        ended, active = (
            runs.create_run(
                store=store,
                queue=queue,
                task_dir=make_task(tmp_path / f"task{n}", QUICK),
                shards=from_count(1),
                options=RunOptions(),
            )
            for n in range(2)
        )
        # A runner killed mid-run leaves its subscription behind, open; its run ends later.
        per_run.open(ended.run_id)
        per_run.open(active.run_id)
        runs.save_manifest(store, ended.with_state(RunState.FINISHED))
        unborn = "r20991231-000000-abcdef"  # made just now, its manifest not written yet
        per_run.open(unborn)
        per_run.open("r20991231-000000-fedcba")  # the next submit cleans up...
        left = set(per_run.existing())
        assert ended.run_id not in left  # ...a finished run's subscription
        assert {active.run_id, unborn} <= left  # but not an active run's, nor a new one's
    finally:
        for path in per_run.existing().values():
            per_run.delete(path)
        queue.close()
        subscriber.close()
