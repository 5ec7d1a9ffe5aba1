"""Compute's retry policy through the fake Compute API and the real client: transient answers are
retried and said, a mutation is retried under one ``requestId`` (the fake, like Compute, answers
a repeat without doing it twice), a rate-limit burst waits into the next minute, and a watch
that meets all of them still finishes its run."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from runner.backends.gcp.fleet import GceFleet
from runner.engine import runs
from runner.engine.shards import from_count
from runner.engine.watch import Snapshot, Watcher
from tests.e2e.conftest import make_task, wait_for
from tests.emulators import PROJECT, Deployment
from tests.gcp.conftest import MakeCompute, ShortClock, run_parts, worker_spawner
from tests.gcp.fake_compute import RESET, FakeCompute, sleeper
from tests.gcp.faults import FaultPlan
from worker.backends.gcp.gcs import GcsStore
from worker.backends.gcp.retry import MINUTE
from worker.backends.gcp.vm import leave_group
from worker.errors import BackendError, NotFound
from worker.protocol import RunOptions, RunState

ZONE = "us-central1-a"
GROUP = "cflow-workers"
GET_GROUP = rf"/instanceGroupManagers/{GROUP}$"


def _fleet(fake: FakeCompute, said: list[str]) -> tuple[GceFleet, ShortClock]:
    clock = ShortClock()
    fake.clock = clock.time  # the fake's quota windows on the runner's clock
    return GceFleet(project=PROJECT, group=GROUP, zone=ZONE, clock=clock, say=said.append), clock


def _request_ids(fake: FakeCompute, verb: str) -> list[str]:
    paths = [p for m, p in fake.requests if m == "POST" and urlparse(p).path.endswith(verb)]
    return [parse_qs(urlparse(p).query).get("requestId", [""])[0] for p in paths]


def test_a_resize_whose_answer_was_lost_is_retried_once_under_its_request_id(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, group=GROUP, zone=ZONE)
    said: list[str] = []
    fleet, _ = _fleet(fake, said)
    fake.fail_next("POST", r"/resize$", 504)  # DEADLINE_EXCEEDED: not done
    fake.fail_next("POST", r"/resize$", RESET, lost=True)  # done, then the answer lost
    names = fleet.grow(2)
    assert len(names) == 2 and fleet.target_size() == 2
    ids = _request_ids(fake, "/resize")
    assert len(ids) == 3 and len(set(ids)) == 1 and ids[0]
    assert fake.repeated == ids[:1] and fake.resizes == [2]  # carried out once
    assert said[0].startswith("Compute answered 504 to resize instance group cflow-workers")
    assert "a reset connection" in said[1] and "retrying in" in said[1]
    fleet.delete(names)
    assert fleet.wait_empty(10)


def test_a_delete_whose_answer_was_lost_is_not_done_twice(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, group=GROUP, zone=ZONE)
    said: list[str] = []
    fleet, _ = _fleet(fake, said)
    a, b = fleet.grow(2)
    fake.fail_next("POST", r"/deleteInstances$", 503, "backendError")
    fake.fail_next("POST", r"/deleteInstances$", RESET, lost=True)
    fleet.delete([a])
    ids = _request_ids(fake, "/deleteInstances")
    assert len(ids) == 3 and len(set(ids)) == 1 and fake.repeated == ids[:1]
    assert fake.deleted == [a] and fleet.target_size() == 1
    assert "Compute answered 503 backendError to delete instances of" in said[0]
    fleet.delete([b])
    assert fleet.wait_empty(10)


def test_a_worker_leaving_retries_resource_not_ready_under_one_request_id(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, group=GROUP, zone=ZONE)
    fleet, _ = _fleet(fake, [])
    a, b = fleet.grow(2)
    # Hundreds of workers leaving at once: the group is busy with another operation.
    fake.fail_next("POST", r"/deleteInstances$", 400, "resourceNotReady")
    fake.fail_next("POST", r"/deleteInstances$", 502)
    fake.fail_next("POST", r"/deleteInstances$", RESET, lost=True)
    slept: list[float] = []
    assert leave_group(
        project=PROJECT, group=GROUP, zone=ZONE, region=None, instance=a, sleep=slept.append
    )
    assert len(slept) == 3
    ids = _request_ids(fake, "/deleteInstances")
    assert len(ids) == 4 and len(set(ids)) == 1 and fake.repeated == ids[:1]
    assert fake.deleted == [a] and fleet.target_size() == 1
    fleet.delete([b])
    assert fleet.wait_empty(10)


def test_a_rate_limit_burst_waits_into_the_next_minute_instead_of_giving_up(
    fake_compute: MakeCompute,
) -> None:
    fake = fake_compute(spawn=sleeper, group=GROUP, zone=ZONE)
    said: list[str] = []
    fleet, clock = _fleet(fake, said)
    # Eight refusals in a row: more than the 6 tries (31 s of pauses) a runner used to allow.
    fake.fail_next("GET", GET_GROUP, 403, "rateLimitExceeded", times=8)
    assert fleet.target_size() == 0
    assert len(clock.pauses) == 8
    for asked, pause in clock.pauses:
        assert (asked + pause) // MINUTE > asked // MINUTE  # resumed in a later minute
    assert all("403 rateLimitExceeded" in s and "next minute" in s for s in said)


def test_a_permanent_refusal_still_ends_in_one_line(fake_compute: MakeCompute) -> None:
    fake = fake_compute(spawn=sleeper, group=GROUP, zone=ZONE)
    said: list[str] = []
    fleet, clock = _fleet(fake, said)
    fake.fail_next("GET", GET_GROUP, 403, "forbidden")
    with pytest.raises(BackendError) as err:
        fleet.target_size()
    assert str(err.value).startswith("no permission to read instance group cflow-workers")
    assert said == [] and clock.pauses == []


def test_a_resize_operation_that_ends_in_error_is_said_and_asked_again_later(
    fake_compute: MakeCompute,
) -> None:
    plan = FaultPlan(rate=1.0, seed=3, kinds={"operation_error"})  # every mutation's operation
    fake = fake_compute(spawn=sleeper, group=GROUP, zone=ZONE, faults=plan)
    said: list[str] = []
    fleet, _ = _fleet(fake, said)
    assert fleet.grow(1) == []  # not raised: the next look grows again
    assert any("resize of instance group cflow-workers" in s and "failed" in s for s in said)
    with plan.suspended():
        (name,) = fleet.grow(1)
        fleet.delete([name])
        assert fleet.wait_empty(10)


def _workers(d: Deployment, fake_compute: MakeCompute, tmp_path: Path) -> FakeCompute:
    holder: dict[str, str] = {}
    spawn = worker_spawner(
        d,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
        idle_timeout=120.0,  # only the runner scales the group down here
    )
    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE)
    holder["endpoint"] = fake.endpoint
    return fake


@pytest.mark.emulator
def test_a_watch_through_503s_a_deadline_a_reset_and_a_rate_limit_burst_finishes(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    fake = _workers(deployment, fake_compute, tmp_path)
    said: list[str] = []
    fleet, _ = _fleet(fake, said)
    fake.fail_next("POST", r"/listManagedInstances$", 503, "backendError", times=3)
    fake.fail_next("POST", r"/resize$", 504)
    fake.fail_next("POST", r"/resize$", RESET, lost=True)
    fake.fail_next("GET", GET_GROUP, 403, "rateLimitExceeded", times=4)
    fake.fail_next("POST", r"/deleteInstances$", RESET, lost=True)
    fake.fail_next("POST", r"/listManagedInstances$", RESET, times=2)
    parts = run_parts(deployment)
    store, queue, subscriber, per_run = parts.store, parts.queue, parts.subscriber, parts.per_run
    manifest = runs.create_run(
        store=store,
        queue=queue,
        task_dir=make_task(tmp_path / "task", "def run(shard):\n    pass\n"),
        shards=from_count(4),
        options=RunOptions(),
    )
    watcher = Watcher(
        manifest=manifest,
        store=store,
        queue=queue,
        events=per_run.open(manifest.run_id),
        fleet=fleet,
        max_workers=2,
        reconcile_seconds=2.0,
    )
    result: list[Snapshot] = []

    def watch() -> None:
        result.append(watcher.watch(poll_seconds=0.5))
        watcher.drain_fleet(timeout=60)

    thread = threading.Thread(target=watch)
    thread.start()
    thread.join(180)
    try:
        assert result, "the watch finished"
        assert result[0].succeeded == 4 and result[0].failed == 0
        assert runs.committed(store, manifest.run_id) == {
            s.id for s in runs.iter_shards(store, manifest.run_id)
        }
        wait_for(fake.is_empty, 60, "the group at zero")
        text = "\n".join(said)
        for answer in ("503 backendError", "504", "a reset connection", "403 rateLimitExceeded"):
            assert f"Compute answered {answer} to " in text, text
        assert fake.repeated, "a mutation whose answer was lost was answered, not redone"
        assert not fake.resized_down()
    finally:
        runs.save_manifest(store, manifest.with_state(RunState.FINISHED))
        watcher.events.close()
        fleet.close()
        queue.close()
        subscriber.close()


@pytest.mark.emulator
def test_a_read_modify_write_is_never_lost_to_a_writer_in_between(deployment: Deployment) -> None:
    store = GcsStore(deployment.bucket)
    key = "runs/r-1/run.json"
    store.put(key, json.dumps({"state": "active"}).encode())
    seen: list[dict[str, object]] = []

    def halt(raw: bytes) -> bytes:
        current = json.loads(raw)
        seen.append(current)
        if len(seen) == 1:  # a `runner retry` writes between this read and this write
            store.put(key, json.dumps({"state": "active", "round": 2}).encode())
        return json.dumps({**current, "halted": "image cannot be pulled"}).encode()

    store.update(key, halt)
    assert seen == [{"state": "active"}, {"state": "active", "round": 2}]
    assert json.loads(store.get(key)) == {
        "state": "active",
        "round": 2,
        "halted": "image cannot be pulled",
    }
    assert store.update(key, lambda raw: None) is None  # nothing to change: nothing written
    with pytest.raises(NotFound):
        store.update("runs/none/run.json", lambda raw: raw)
