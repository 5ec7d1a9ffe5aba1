"""A run's manifest is changed only by read-change-write under the store's update: a
``runner cancel`` landing while a runner records a published batch is never overwritten."""

from __future__ import annotations

import threading
from pathlib import Path

from runner.engine import runs
from worker.backends.local.backend import open_local
from worker.backends.local.store import LocalStore
from worker.protocol import Layout, RunOptions, RunState, Shard, new_run_id

# How long the cancel is given to get past the publisher's read. With the lock it waits for
# the publisher however long this is; without one it writes within it, and is overwritten.
CANCEL_GRACE = 0.3  # seconds


class _PausingStore(LocalStore):
    """Pauses the first read of ``key`` after it has read it, until told to go on."""

    def __init__(self, root: Path, key: str):
        super().__init__(root)
        self.key = key
        self.read = threading.Event()
        self.go = threading.Event()

    def get(self, key: str) -> bytes:
        data = super().get(key)
        if key == self.key and not self.read.is_set():
            self.read.set()
            assert self.go.wait(30), "the test never let the read go on"
        return data


def test_a_cancel_between_a_publishers_read_and_write_survives(tmp_path: Path) -> None:
    b = open_local(tmp_path / "store")
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text("def run(shard):\n    pass\n")
    run_id = new_run_id()
    store = _PausingStore(tmp_path / "store", Layout.manifest(run_id))
    made: list[object] = []

    def publish() -> None:
        made.append(
            runs.create_run(
                store=store,
                queue=b.queue,
                task_dir=task,
                shards=iter([Shard(id=f"s{i}", index=i) for i in range(3)]),
                options=RunOptions(),
                run_id=run_id,
            )
        )

    publisher = threading.Thread(target=publish)
    publisher.start()
    assert store.read.wait(30)  # the publisher read the manifest to record its batch
    cancelled = threading.Event()

    def cancel() -> None:
        runs.cancel(LocalStore(tmp_path / "store"), b.queue, run_id)  # another runner's
        cancelled.set()

    canceller = threading.Thread(target=cancel)
    canceller.start()
    waited = not cancelled.wait(CANCEL_GRACE)
    store.go.set()
    publisher.join(30)
    canceller.join(30)
    assert waited, "the cancel did not wait for the publisher's write"
    assert cancelled.is_set() and made
    manifest = runs.load_manifest(store, run_id)
    assert manifest.state == RunState.CANCELLED.value  # the cancel, over the publisher's
    assert manifest.published == 3  # and the publisher's count, under the cancel
    b.close()
