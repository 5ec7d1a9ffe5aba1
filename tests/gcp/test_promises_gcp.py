"""The runner's promises on the Google Cloud backends (the emulators, real workers in the fake
group), through the CLI: a frozen worker does not stall a run, an interrupted submit is finished
by watch, preemption never burns the failure budget, a task that cannot work halts the run, and
a shard that keeps killing its workers is dead-lettered by Pub/Sub and reported failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.test_gcp_e2e import Cloud, _busy, _cloud
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import Layout, Manifest

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

LEASE, HEARTBEAT = "10", "2"  # seconds, for the workers and the runner alike

# Each attempt says where it runs, then waits while the hold file exists: the test freezes a
# worker in the middle of a shard, then lets the others through at once.
HELD_WHILE = """
import os, time
from pathlib import Path

def run(shard):
    marks = Path(os.environ["MARK_DIR"])
    (marks / f"{os.environ['CFLOW_WORKER_NAME']}.{shard.index}.{shard.attempt}").touch()
    while Path(os.environ["HOLD_FILE"]).exists():
        time.sleep(0.05)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


def test_a_frozen_vm_does_not_stall_the_run(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks, hold = tmp_path / "marks", tmp_path / "hold"
    marks.mkdir()
    hold.touch()
    cloud = _cloud(
        deployment,
        fake_compute,
        tmp_path,
        env={"MARK_DIR": str(marks), "HOLD_FILE": str(hold)},
        extra_args=("--lease-seconds", LEASE, "--heartbeat", HEARTBEAT),
    )
    cloud.env.update(CFLOW_LEASE_SECONDS=LEASE, CFLOW_HEARTBEAT_SECONDS=HEARTBEAT)
    task = make_task(tmp_path / "task", HELD_WHILE)
    heard = _listen_to_events(deployment)
    submit = cloud.start("submit", str(task), "--shards", "2", "--workers", "1")
    frozen = None
    ended = threading.Event()
    try:
        name = _busy(marks, set())
        # Frozen once its word of work is out (a VM frozen before anything of it reached its
        # runner is another case: one that came up under the runner's eyes may be booting).
        wait_for(lambda: name in heard(), 30, "the busy worker's word of work published")
        frozen = cloud.fake.live()[name].pid
        os.kill(frozen, signal.SIGSTOP)  # its leases lapse; its heartbeats stop
        wait_for(lambda: _stopped(frozen), 10, "the worker stopped")
        hold.unlink()  # its attempt ends with nobody to commit it; the next VM's run through
        stopper = threading.Thread(target=_stop_when_deleted, args=(cloud, name, frozen, ended))
        stopper.start()
        try:
            stdout, stderr = submit.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            submit.kill()
            stdout, stderr = submit.communicate()
            pytest.fail(f"the run did not end within 240 s; the runner said:\n{stderr}")
    finally:
        ended.set()
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, stderr
    run_id = stdout.strip().splitlines()[0]
    assert cloud.status(run_id)["counts"]["succeeded"] == 2
    started_on = {m.name.split(".")[0] for m in marks.iterdir()}
    assert len(started_on) >= 2  # another VM took the frozen one's shard
    assert name in cloud.fake.deleted  # the runner let the frozen VM go
    assert "some workers are still stopping" not in stderr


def _listen_to_events(d: Deployment) -> Callable[[], set[str]]:
    """A subscription of the test's own to the events topic: the workers heard working."""
    import google.cloud.pubsub_v1 as pubsub_v1

    subscriber = pubsub_v1.SubscriberClient()
    name = f"projects/{d.project}/subscriptions/{d.events_subscription}-test"
    subscriber.create_subscription(
        request={"name": name, "topic": f"projects/{d.project}/topics/{d.events_topic}"}
    )
    working: set[str] = set()

    def heard() -> set[str]:
        response = subscriber.pull(
            request={"subscription": name, "max_messages": 100, "return_immediately": True},
            timeout=10,
        )
        for m in response.received_messages:
            event = json.loads(m.message.data)
            if event.get("kind") in ("started", "heartbeat"):
                working.add(str(event.get("worker")))
        if response.received_messages:
            subscriber.acknowledge(
                request={
                    "subscription": name,
                    "ack_ids": [m.ack_id for m in response.received_messages],
                }
            )
        return working

    return heard


def _stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0] == "T"


def _stop_when_deleted(cloud: Cloud, name: str, pid: int, ended: threading.Event) -> None:
    """Stop a frozen VM's process once the group deletes it: deleting a VM stops it whatever
    its guest does (the fake's SIGTERM alone would wait for the frozen process forever)."""
    while not ended.wait(0.05):
        if name in cloud.fake.deleted:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return


def test_a_runner_killed_while_publishing_is_finished_by_watch_on_pubsub(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path)
    task = make_task(tmp_path / "task", "def run(shard):\n    pass\n")
    # Batches of 10 (the test hook beside the pause): the same boundary as 1,000 a batch, with
    # 25 shards to run instead of 1,010.
    cloud.env.update(CFLOW_PUBLISH_PAUSE="30", CFLOW_PUBLISH_BATCH="10")
    submit = cloud.start("submit", str(task), "--shards", "25", "--workers", "2")
    assert submit.stdout is not None
    run_id = submit.stdout.readline().strip()

    bucket = GcsStore(deployment.bucket)

    def published() -> int:
        manifest = Manifest.from_json(bucket.get(Layout.manifest(run_id)))
        return manifest.published or 0

    wait_for(published, 60, "the first batch published")
    submit.kill()
    submit.communicate(timeout=30)
    assert published() == 10
    cloud.env["COLUMNS"] = "200"
    assert "publishing (10/25)" in cloud.run("runs").stdout
    cloud.env.pop("CFLOW_PUBLISH_PAUSE")
    watched = cloud.run("watch", run_id, timeout=300)
    assert watched.returncode == 0, watched.stderr
    assert "interrupted while publishing" in watched.stderr
    status = cloud.status(run_id)
    assert status["counts"]["succeeded"] == 25
    assert status["state"] == "finished"


HELD = """
import os, time
from pathlib import Path

def run(shard):
    marks = Path(os.environ["MARK_DIR"])
    (marks / f"{os.environ['CFLOW_WORKER_NAME']}.{shard.index}.{shard.attempt}").touch()
    while shard.index == 0 and not (marks / "go").exists():
        time.sleep(0.1)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


def _marks(marks: Path, index: int) -> list[Path]:
    return [m for m in marks.iterdir() if m.name.split(".")[1:2] == [str(index)]]


def test_preemption_never_burns_the_failure_budget_on_google_cloud(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cloud = _cloud(deployment, fake_compute, tmp_path, env={"MARK_DIR": str(marks)})
    task = make_task(tmp_path / "task", HELD)
    submit = cloud.start(
        "submit", str(task), "--shards", "4", "--workers", "2", "--max-attempts", "1"
    )
    preempted: list[str] = []
    try:
        for attempt in (1, 2):  # shard 0 holds its worker until the flag: preempt it twice
            mark = wait_for(
                lambda a=attempt: [m for m in _marks(marks, 0) if m.name.endswith(f".{a}")],
                90,
                f"shard 0's attempt {attempt} running",
            )[0]
            worker = mark.name.split(".")[0]
            cloud.fake.live()[worker].send_signal(signal.SIGTERM)  # how Spot preemption begins
            preempted.append(worker)
        wait_for(lambda: [m for m in _marks(marks, 0) if m.name.endswith(".3")], 90, "attempt 3")
        (marks / "go").touch()
        stdout, stderr = submit.communicate(timeout=180)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, stderr  # one attempt allowed, two preemptions: no failure
    status = cloud.status(stdout.strip().splitlines()[0])
    attempts = {
        s["index"]: [(a["state"], a["worker"]) for a in s["attempts"]] for s in status["shards"]
    }
    assert [state for state, _ in attempts[0]] == ["preempted", "preempted", "succeeded"]
    assert [worker for _, worker in attempts[0][:2]] == preempted
    # No other attempt was cut short: the runner never deleted a busy VM.
    assert all(tries == [("succeeded", tries[0][1])] for i, tries in attempts.items() if i), (
        attempts
    )
    assert set(cloud.fake.preempted) >= set(preempted)  # the group recreated them
    wait_for(cloud.fake.is_empty, 60, "the group at zero")


def test_a_task_that_cannot_work_halts_the_run_on_google_cloud(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path)
    task = make_task(
        tmp_path / "task",
        "def run(shard):\n    raise RuntimeError('model file missing: /models/m.bin')\n",
    )
    result = cloud.run("submit", str(task), "--shards", "40", "--workers", "2", timeout=180)
    assert result.returncode == 1, result.stderr
    assert "halted: " in result.stderr
    assert "RuntimeError: model file missing: /models/m.bin" in result.stderr
    run_id = result.stdout.strip().splitlines()[0]
    status = cloud.status(run_id)
    assert status["state"] == "cancelled" and "model file missing" in status["halted"]
    tried = [s for s in status["shards"] if s["attempts"]]
    assert 3 <= len(tried) < 40  # stopped early: most shards never ran
    assert {s["state"] for s in status["shards"]} <= {"failed", "cancelled"}
    # The workers stopped: the runner let them go, and the group ends at zero.
    wait_for(cloud.fake.is_empty, 60, "the group at zero")
    assert not cloud.fake.resized_down()


KILLER = """
import os, signal
from pathlib import Path

def _worker() -> int:
    pid = os.getpid()
    while pid > 1:  # up to the agent: python -m worker
        with open(f"/proc/{pid}/stat") as fh:
            pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if fh.read().split(b"\\0")[1:3] == [b"-m", b"worker"]:
                return pid
    raise RuntimeError("no worker above this task")

def run(shard):
    if shard.index == 0:  # kills its worker, every time it runs
        os.kill(_worker(), signal.SIGKILL)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


def test_a_shard_that_keeps_killing_its_worker_is_dead_lettered_and_failed(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    # The emulator's work subscription has Pub/Sub's dead-letter policy at its least: five
    # deliveries (tests/emulators.py); a killed worker's lease lapses after 10 s.
    cloud = _cloud(deployment, fake_compute, tmp_path, extra_args=("--lease-seconds", "10"))
    task = make_task(tmp_path / "task", KILLER)
    result = cloud.run("submit", str(task), "--shards", "3", "--workers", "2", timeout=300)
    assert result.returncode == 1, result.stderr
    run_id = result.stdout.strip().splitlines()[0]
    status = cloud.status(run_id)
    shards = {s["index"]: s for s in status["shards"]}
    assert shards[0]["state"] == "failed" and "dead-lettered" in shards[0]["reason"], shards[0]
    # One attempt per delivery (Pub/Sub counts them approximately), each cut off with its VM.
    tries = shards[0]["attempts"]
    assert len(tries) >= 5 and "succeeded" not in {a["state"] for a in tries}, tries
    assert shards[1]["state"] == shards[2]["state"] == "succeeded"
    assert len(cloud.fake.preempted) >= 5  # every killed VM was recreated by the group
    wait_for(cloud.fake.is_empty, 60, "the group at zero")
