"""Runs at once on one deployment: each has its own events subscription, both finish once, and
neither's runner stops an attempt of the other by deleting its worker (scaling down at its end,
or letting its workers go when it is cancelled).

Real workers (``python -m worker --backend gcp``) in a fake group on the emulators; two runners'
watchers, each with its own fleet client, as two ``runner submit`` would have, or two
``runner submit`` commands.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from runner.backends.gcp.fleet import GceFleet
from runner.engine import runs
from runner.engine.reports import shard_reports
from runner.engine.shards import from_count
from runner.engine.watch import Snapshot, Watcher
from tests.e2e.conftest import make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, run_parts, worker_spawner
from tests.gcp.fake_compute import FakeCompute
from tests.gcp.test_gcp_e2e import Cloud, _cloud
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
    parts = run_parts(deployment)
    store, queue, subscriber, per_run = parts.store, parts.queue, parts.subscriber, parts.per_run
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
            # Every one of its shards' events reaches its watcher, none taken by the other run's
            # subscription; events may still be on their way when the store says the run is over.
            wait_for(
                lambda w=w: _own_successes(w, seen[w.run_id]) == w.manifest.shard_count,
                30,
                f"every succeeded event of run {w.run_id}",
            )
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


def _own_successes(w: Watcher, seen: list[Event]) -> int:
    """Shards of ``w``'s run its watcher heard succeed, after taking what has arrived since."""
    seen.extend(w.events.pull(timeout=0.5))
    return len({e.shard_id for e in seen if e.run_id == w.run_id and e.kind == "succeeded"})


def test_stale_run_subscriptions_are_cleaned_up_by_the_next_run(
    deployment: Deployment, tmp_path: Path
) -> None:
    parts = run_parts(deployment)
    store, queue, subscriber, per_run = parts.store, parts.queue, parts.subscriber, parts.per_run
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


# -- runs that share the group's workers, through the CLI --------------------------------------

HOLD = """
import os, time
from pathlib import Path

def run(shard):
    marks = Path(os.environ["MARK_DIR"])
    (marks / f"{RUN}.{os.environ['CFLOW_WORKER_NAME']}.{shard.index}.{shard.attempt}").touch()
    while not (marks / "go").exists():  # until the test lets it go (or the run is cancelled)
        time.sleep(0.1)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


def _holding(folder: Path, run: str) -> Path:
    """A task whose shards mark their start (``<run>.<worker>.<index>.<attempt>``) and hold
    their worker until the ``go`` flag exists."""
    return make_task(folder, HOLD.replace("RUN", repr(run)))


def _started(marks: Path, run: str) -> list[str]:
    return [m.name for m in marks.glob(f"{run}.*")]


def _only_first_attempts(cloud: Cloud, run_id: str, shards: int) -> None:
    """Every shard of the run committed by its first attempt, and no attempt of it was stopped
    (preempted) by another run's runner deleting its worker."""
    status = cloud.status(run_id)
    attempts = {
        s["index"]: [(a["attempt"], a["state"]) for a in s["attempts"]] for s in status["shards"]
    }
    assert attempts == {i: [(1, "succeeded")] for i in range(shards)}, attempts
    assert [s["winning_attempt"] for s in status["shards"]] == [1] * shards


def test_cancelling_a_run_leaves_the_workers_busy_with_another_run_alone(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cloud = _cloud(
        deployment, fake_compute, tmp_path, env={"MARK_DIR": str(marks)}, idle_timeout=120.0
    )
    first = cloud.start(
        "submit", str(_holding(tmp_path / "a", "a")), "--shards", "2", "--workers", "2"
    )
    second = None
    try:
        assert first.stdout is not None
        a_id = first.stdout.readline().strip()
        wait_for(lambda: len(_started(marks, "a")) == 2, 90, "run A's shards on both its VMs")
        # B asks for two more VMs (A's two are busy), which take two of its four shards.
        second = cloud.start(
            "submit", str(_holding(tmp_path / "b", "b")), "--shards", "4", "--workers", "4"
        )
        assert second.stdout is not None
        b_id = second.stdout.readline().strip()
        wait_for(lambda: len(_started(marks, "b")) == 2, 90, "run B's shards beside A's")
        cancelled = cloud.run("cancel", a_id)
        assert cancelled.returncode == 0, cancelled.stderr
        _, a_err = first.communicate(timeout=120)  # A's runner lets its workers go, then ends
        assert first.returncode == 1 and "was cancelled" in a_err, a_err
        (marks / "go").touch()
        _, b_err = second.communicate(timeout=180)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert second.returncode == 0, b_err
    assert cloud.status(a_id)["state"] == "cancelled"
    _only_first_attempts(cloud, b_id, 4)  # B lost no attempt to A's cancel
    wait_for(cloud.fake.is_empty, 60, "the group at zero")
    assert not cloud.fake.resized_down()


def test_the_end_of_a_run_leaves_the_workers_busy_with_another_run_alone(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cloud = _cloud(
        deployment,
        fake_compute,
        tmp_path,
        env={"MARK_DIR": str(marks)},
        idle_timeout=120.0,
        # B's workers say nothing while A runs: A never learns that they are busy.
        extra_args=("--heartbeat", "45"),
    )
    held = cloud.start(
        "submit", str(_holding(tmp_path / "b", "b")), "--shards", "2", "--workers", "2"
    )
    try:
        assert held.stdout is not None
        b_id = held.stdout.readline().strip()
        wait_for(lambda: len(_started(marks, "b")) == 2, 90, "run B's shards on both its VMs")
        # A runs on two VMs of its own and ends while B's workers are still busy.
        quick = make_task(tmp_path / "a", "def run(shard):\n    pass\n")
        finished = cloud.run("submit", str(quick), "--shards", "4", "--workers", "4", timeout=120)
        assert finished.returncode == 0, finished.stderr
        a_id = finished.stdout.strip().splitlines()[0]
        (marks / "go").touch()
        _, b_err = held.communicate(timeout=180)
    finally:
        if held.poll() is None:
            held.kill()
    assert held.returncode == 0, b_err
    _only_first_attempts(cloud, a_id, 4)
    _only_first_attempts(cloud, b_id, 2)  # B lost no attempt when A's runner scaled down
    wait_for(cloud.fake.is_empty, 60, "the group at zero")
    assert not cloud.fake.resized_down()


def test_a_finished_run_whose_subscription_another_run_cleaned_up_hears_nothing_more(
    deployment: Deployment, tmp_path: Path
) -> None:
    parts = run_parts(deployment)
    store, queue, subscriber, per_run = parts.store, parts.queue, parts.subscriber, parts.per_run
    try:
        run = runs.create_run(
            store=store,
            queue=queue,
            task_dir=make_task(tmp_path / "task", QUICK),
            shards=from_count(1),
            options=RunOptions(),
        )
        bus = per_run.open(run.run_id)
        assert bus.pull(timeout=0.5) == []  # its stream is open
        # The run is finished and its runner still drains the workers when another runner
        # starts and cleans up the subscriptions of runs that are over.
        runs.save_manifest(store, run.with_state(RunState.FINISHED))
        per_run.open("r20991231-000000-fedcba")
        assert run.run_id not in per_run.existing()
        # The draining runner hears nothing more, and does not fail for it.
        wait_for(lambda: bus.pull(timeout=0.5) == [] and bus.gone, 30, "the stream's end seen")
        bus.close()
    finally:
        for path in per_run.existing().values():
            per_run.delete(path)
        queue.close()
        subscriber.close()
