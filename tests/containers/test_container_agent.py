"""The agent with a run no worker can start (an image it cannot pull, GPUs the engine cannot
pass in): the run stops, with the reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.agent.agent import Agent, AgentConfig
from worker.backends.local.backend import open_local
from worker.bundle import pack
from worker.executors.container.gpus import DOCKER_GPU_HOOK, nvidia_cdi_specs
from worker.executors.container.runtime import Runtime, detect_runtime
from worker.protocol import Layout, Manifest, RunOptions, RunState, Shard, WorkMessage


@pytest.fixture(autouse=True)
def _the_agent_uses_the_engine_under_test(
    container_runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The agent finds its engine itself, as a worker does: the one ``CFLOW_CONTAINER_RUNTIME``
    names."""
    monkeypatch.setenv("CFLOW_CONTAINER_RUNTIME", container_runtime.name)
    detect_runtime.cache_clear()
    yield
    detect_runtime.cache_clear()


def _halted_run(tmp_path: Path, entry: str, options: RunOptions) -> tuple[Manifest, int, int]:
    """Run 20 shards of a one-line task with ``options`` to the end; the manifest after, how
    many attempts were recorded and how many shards are still queued."""
    task = tmp_path / "task"
    task.mkdir()
    if entry == "shell":
        (task / "task.sh").write_text("true\n")
    else:
        (task / "task.py").write_text("def run(shard):\n    pass\n")
    b = open_local(tmp_path / "store")
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    manifest = Manifest(
        run_id="r-halted", bundle=sha, entry=entry, shard_count=20, options=options.to_dict()
    )
    b.store.put(Layout.manifest(manifest.run_id), manifest.to_json())
    b.queue.publish(
        WorkMessage(run_id=manifest.run_id, shard=Shard(id=f"s{i}", index=i).to_dict())
        for i in range(20)
    )
    agent = Agent(
        queue=b.queue,
        store=b.store,
        events=b.events,
        ledger=b.ledger,
        config=AgentConfig(name="w", scratch=tmp_path / "s", burst=True, poll_seconds=0.2),
    )
    agent.run()
    after = Manifest.from_json(b.store.get(Layout.manifest(manifest.run_id)))
    statuses = list(b.store.list(Layout.shards_prefix(manifest.run_id), suffix="status.json"))
    return after, len(statuses), b.queue.stats(manifest.run_id).queued


def test_an_image_that_cannot_be_pulled_stops_the_run_not_every_shard(
    tmp_path: Path, container_runtime: Runtime
) -> None:
    image = "localhost/cflow-test-missing-for-agent:never"
    after, attempts, queued = _halted_run(tmp_path, "shell", RunOptions(image=image))
    assert after.state == RunState.CANCELLED.value
    assert after.halted is not None and image in after.halted
    assert attempts == 1  # one attempt found out; the rest were dropped with the run
    assert queued == 0


def test_a_gpu_the_engine_cannot_pass_in_stops_the_run_not_every_shard(
    tmp_path: Path, container_runtime: Runtime, python_image: str
) -> None:
    if nvidia_cdi_specs() or shutil.which(DOCKER_GPU_HOOK):
        pytest.skip("this machine can pass GPUs into containers")
    options = RunOptions(image=python_image, gpu="nvidia-l4:1")
    after, attempts, queued = _halted_run(tmp_path, "python", options)
    assert after.state == RunState.CANCELLED.value
    assert after.halted is not None and after.halted.startswith("the run has a GPU but ")
    assert "nvidia-ctk" in after.halted and "\n" not in after.halted
    assert attempts == 1 and queued == 0
