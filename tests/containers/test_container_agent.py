"""The agent with a container image no worker can pull: the run stops, with the reason."""

from __future__ import annotations

from pathlib import Path

from worker.agent import Agent, AgentConfig
from worker.backends import open_local
from worker.bundle import pack
from worker.container_runtime import Runtime
from worker.protocol import Layout, Manifest, RunOptions, RunState, Shard, WorkMessage


def test_an_image_that_cannot_be_pulled_stops_the_run_not_every_shard(
    tmp_path: Path, container_runtime: Runtime
) -> None:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.sh").write_text("true\n")
    b = open_local(tmp_path / "store")
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    image = "localhost/cflow-test-missing:never"
    manifest = Manifest(
        run_id="r-noimage",
        bundle=sha,
        entry="shell",
        shard_count=20,
        options=RunOptions(image=image).to_dict(),
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
        config=AgentConfig(name="w", scratch=tmp_path / "s", burst=True, poll_seconds=0.2),
    )
    agent.run()
    after = Manifest.from_json(b.store.get(Layout.manifest(manifest.run_id)))
    assert after.state == RunState.CANCELLED.value
    assert after.halted is not None and image in after.halted
    statuses = list(b.store.list(Layout.shards_prefix(manifest.run_id), suffix="status.json"))
    assert len(statuses) == 1  # one attempt found out; the rest were dropped with the run
    assert b.queue.stats(manifest.run_id).queued == 0
