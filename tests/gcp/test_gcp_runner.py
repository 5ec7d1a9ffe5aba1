"""The runner's Google Cloud deployment: inputs staged before publishing.

(A shard dead-lettered by Pub/Sub is reported failed: tests/gcp/test_promises_gcp.py runs that
whole chain, from a shard that keeps killing its worker.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.backends.gcp.deployment import open_gcp_deployment
from runner.config import Backend, Config
from runner.engine import runs
from runner.engine.deployment import Deployment
from runner.engine.shards import from_glob
from tests.e2e.conftest import make_inputs, make_task
from tests.emulators import Deployment as Resources
from tests.emulators import open_backends
from tests.gcp.conftest import MakeCompute
from tests.gcp.fake_compute import sleeper
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import RunOptions
from worker.queue import Delivery

pytestmark = pytest.mark.emulator


@pytest.fixture
def gcp(deployment: Resources, fake_compute: MakeCompute) -> Iterator[Deployment]:
    fake_compute(spawn=sleeper)
    fields = deployment.outputs(zone="us-central1-a", group="cflow-workers")
    opened = open_gcp_deployment(Config(backend=Backend.GCP, **fields))
    try:
        yield opened
    finally:
        opened.close()


def test_local_inputs_are_stored_before_their_shards_are_published(
    gcp: Deployment, deployment: Resources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_file = GcsStore.put_file

    def slow_put_file(self: GcsStore, key: str, path: Path) -> None:
        if "/inputs/" in key:
            time.sleep(0.3)  # uploads outlast writing the manifest and shard list
        put_file(self, key, path)

    monkeypatch.setattr(GcsStore, "put_file", slow_put_file)
    inputs = make_inputs(tmp_path / "in", [f"part {i}.csv" for i in range(30)], rows=200)
    task = make_task(tmp_path / "task", "def run(shard):\n    pass\n")
    manifest = runs.create_run(
        store=gcp.backends.store,
        queue=gcp.backends.queue,
        task_dir=task,
        shards=from_glob(str(inputs / "*.csv")),
        options=RunOptions(),
        stage_input=gcp.stage_input,
    )
    worker = open_backends(deployment)
    try:
        got: list[Delivery] = []
        deadline = time.monotonic() + 20
        while len(got) < 30 and time.monotonic() < deadline:
            got += worker.queue.receive(30, 1.0)
        for delivery in got:
            shard = delivery.message.shard_record
            assert shard.input and shard.input.startswith(f"gs://{deployment.bucket}/runs/")
            fetched = tmp_path / "fetched.csv"
            worker.store.fetch(shard.input, fetched)  # there already, as the message arrived
            assert fetched.read_text().startswith("id,value\n")
            worker.queue.ack(delivery)
    finally:
        worker.close()
    assert len(got) == manifest.shard_count == 30
