"""The runner's promises on the Google Cloud backends (the emulators, real workers in the fake
group): a frozen worker does not stall a run, and an interrupted submit is finished by watch.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute
from tests.gcp.test_gcp_e2e import _busy, _cloud
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import Layout, Manifest

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

LEASE, HEARTBEAT = "10", "2"  # seconds, for the workers and the runner alike

SLOW = """
import os, time
from pathlib import Path

def run(shard):
    marks = Path(os.environ["MARK_DIR"])
    (marks / f"{os.environ['CFLOW_WORKER_NAME']}.{shard.index}.{shard.attempt}").touch()
    time.sleep(6)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


def test_a_frozen_vm_does_not_stall_the_run(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    cloud = _cloud(
        deployment,
        fake_compute,
        tmp_path,
        env={"MARK_DIR": str(marks)},
        extra_args=("--lease-seconds", LEASE, "--heartbeat", HEARTBEAT),
    )
    cloud.env.update(CFLOW_LEASE_SECONDS=LEASE, CFLOW_HEARTBEAT_SECONDS=HEARTBEAT)
    task = make_task(tmp_path / "task", SLOW)
    submit = cloud.start("submit", str(task), "--shards", "2", "--workers", "1")
    frozen = None
    try:
        name = _busy(marks, set())
        frozen = cloud.fake.live()[name].pid
        os.kill(frozen, signal.SIGSTOP)  # its leases lapse; its heartbeats stop
        stdout, stderr = submit.communicate(timeout=300)
    finally:
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


def test_a_runner_killed_while_publishing_is_finished_by_watch_on_pubsub(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    cloud = _cloud(deployment, fake_compute, tmp_path)
    task = make_task(tmp_path / "task", "def run(shard):\n    pass\n")
    cloud.env["CFLOW_PUBLISH_PAUSE"] = "30"
    submit = cloud.start("submit", str(task), "--shards", "1200", "--workers", "2")
    assert submit.stdout is not None
    run_id = submit.stdout.readline().strip()

    bucket = GcsStore(deployment.bucket)

    def published() -> int:
        manifest = Manifest.from_json(bucket.get(Layout.manifest(run_id)))
        return manifest.published or 0

    wait_for(published, 60, "the first batch published")
    submit.kill()
    submit.communicate(timeout=30)
    assert published() == 1000
    cloud.env["COLUMNS"] = "200"
    assert "publishing (1000/1200)" in cloud.run("runs").stdout
    cloud.env.pop("CFLOW_PUBLISH_PAUSE")
    watched = cloud.run("watch", run_id, timeout=300)
    assert watched.returncode == 0, watched.stderr
    assert "interrupted while publishing" in watched.stderr
    status = cloud.status(run_id)
    assert status["counts"]["succeeded"] == 1200
    assert status["state"] == "finished"
