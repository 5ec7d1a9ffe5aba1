"""Header-less copies of parts made by the workers, next to the bucket, not on the runner.

Compose cannot cut an object, so a combine with declared headers needs each later part that starts
with the header without that line. Made on the runner, those bytes cross the runner's network
twice (tens of GB through a laptop for 125 outputs of a few hundred MB). Above
:data:`ON_WORKERS_BYTES` they are made by a small helper run instead: its shards each copy a few
parts, skipping their header, from the bucket to the bucket, on the deployment's own workers. The
helper run is deleted when it has finished; if it fails, the combine fails with its reason and the
parts are untouched.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

from runner.engine import runs
from runner.engine.reports import iter_shard_reports
from runner.results.parts import MakeWatcher, StripJob
from worker.errors import BackendError
from worker.protocol import RunOptions, Shard, ShardState, new_run_id, shard_id_for_index
from worker.queue import EventBus, WorkQueue
from worker.store import Store
from worker.tempdirs import temp_folder

ON_WORKERS_BYTES = 256 * 1024 * 1024  # header-less copies bigger than this are made by workers
ON_WORKERS_ENV = "CFLOW_COMBINE_ON_WORKERS_BYTES"  # overrides it (tests, or to force either way)
JOBS_PER_SHARD = 4  # parts one helper shard copies

STRIP_TASK = textwrap.dedent(
    '''
    """Copy parts of a CFlow run without their first line (written by `runner combine`)."""
    import tempfile
    from pathlib import Path

    from worker.backends.gcp.gcs import make_client
    from worker.backends.gcp.retry import STORAGE_RETRY as DEFAULT_RETRY


    def run(shard):
        bucket = make_client(None).bucket(shard.params["bucket"])
        for source, skip, target in shard.params["jobs"]:
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / "part"
                bucket.blob(source).download_to_filename(str(part), start=skip, retry=DEFAULT_RETRY)
                bucket.blob(target).upload_from_filename(str(part), retry=DEFAULT_RETRY)
            print("copied", source, "without its first", skip, "bytes", flush=True)
    '''
).lstrip()


def threshold() -> int:
    """Bytes of header-less copies above which the workers make them (:data:`ON_WORKERS_ENV`)."""
    value = os.environ.get(ON_WORKERS_ENV)
    return int(value) if value else ON_WORKERS_BYTES


def strip_on_workers(
    store: Store,
    queue: WorkQueue,
    listen: Callable[[str], EventBus],
    make_watcher: MakeWatcher,
    *,
    run_id: str,
    bucket: str,
    jobs: list[StripJob],
    poll_seconds: float,
) -> None:
    """Make every job's header-less copy with a helper run on the workers; wait for it."""
    chunks = [jobs[i : i + JOBS_PER_SHARD] for i in range(0, len(jobs), JOBS_PER_SHARD)]
    shards = [
        Shard(
            id=shard_id_for_index(n, len(chunks)),
            index=n,
            params={"bucket": bucket, "jobs": [[j.source, j.skip, j.target] for j in chunk]},
        )
        for n, chunk in enumerate(chunks)
    ]
    with temp_folder("strip-task") as tmp:
        task = Path(tmp) / f"combine-headers-{run_id}"
        task.mkdir()
        (task / "task.py").write_text(STRIP_TASK)
        helper_id = new_run_id()
        events = listen(helper_id)  # before its shards go out: idle workers take them at once
        helper = runs.create_run(
            store=store,
            queue=queue,
            task_dir=task,
            shards=shards,
            options=RunOptions(max_attempts=3),
            run_id=helper_id,
        )
    watcher = make_watcher(helper, len(shards), events)
    snapshot = watcher.watch(poll_seconds=poll_seconds)
    watcher.drain_fleet()
    if snapshot.cancelled or snapshot.failed:
        failed = [
            r
            for r in iter_shard_reports(store, runs.load_manifest(store, helper.run_id))
            if r.state is not ShardState.SUCCEEDED
        ]
        why = failed[0].reason if failed and failed[0].reason else "it did not finish"
        raise BackendError(
            f"copying parts without their headers on the workers failed ({why}); see"
            f" `runner status {helper.run_id}`",
            run_id=run_id,
        )
    from runner.engine.prune import remove_runs

    remove_runs(store, queue, [runs.load_manifest(store, helper.run_id)])
