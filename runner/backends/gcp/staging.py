"""Input staging for the Google Cloud deployment: what a run's shards read, put in the bucket.

Local inputs are uploaded to ``runs/<run>/inputs/`` (:class:`BucketStager`), ``gs://`` globs are
expanded page by page (:class:`GcsLister`), and a task's requirements are resolved into wheels
it carries (:func:`prepare_task`), so that a VM reads nothing but the bucket.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from runner.backends.gcp.wheels import stage_task
from runner.engine.shards import RemoteLister, readable_stem
from worker.backends.gcp.gcs import GcsStore, file_crc32c
from worker.errors import BackendError, InputError
from worker.protocol import Layout, Shard

UPLOAD_THREADS = 8  # local inputs uploaded at once
UPLOADS_IN_FLIGHT = 64  # uploads queued or running before staging waits for them


class GcsLister(RemoteLister):
    """Expands ``gs://bucket/glob`` into object URIs, listing page by page."""

    def __init__(self, store: GcsStore):
        self.store = store

    def __call__(self, pattern: str) -> Iterator[str]:
        return self.store.glob(pattern)


class BucketStager:
    """Uploads a run's local inputs to ``runs/<run>/inputs/`` in parallel.

    Calling it returns the shard with its ``gs://`` input at once and uploads in the background
    (at most ``UPLOADS_IN_FLIGHT`` pending); :meth:`wait` blocks until every upload is stored.
    An object already there with the same size and CRC32C is not uploaded again.
    """

    def __init__(self, store: GcsStore, *, threads: int = UPLOAD_THREADS):
        self.store = store
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="stage")
        self._slots = threading.BoundedSemaphore(UPLOADS_IN_FLIGHT)
        self._lock = threading.Lock()
        self._futures: list[Future[bool]] = []
        self._existing: dict[str, dict[str, tuple[int, str]]] = {}  # run -> key -> (size, crc)
        self.uploaded = 0
        self.skipped = 0

    def __call__(self, run_id: str, shard: Shard) -> Shard:
        if not shard.input or "://" in shard.input:
            return shard
        path = Path(shard.input)
        if not path.is_file():
            raise InputError(f"input {path} is not a file", run_id=run_id, shard_id=shard.id)
        key = f"{Layout.uploads(run_id)}{shard.id}/{readable_stem(path.name, 120) or 'input'}"
        with self._lock:
            if run_id not in self._existing:  # one listing per run, never one per input
                self._existing[run_id] = self.store.checksums(Layout.uploads(run_id))
            existing = self._existing[run_id].get(key)
        self._slots.acquire()
        future = self._pool.submit(self._upload, key, path, existing)
        future.add_done_callback(lambda _: self._slots.release())
        with self._lock:
            self._futures = [f for f in self._futures if not f.done() or f.exception()]
            self._futures.append(future)
        return Shard(id=shard.id, index=shard.index, input=self.store.url(key), params=shard.params)

    def _upload(self, key: str, path: Path, existing: tuple[int, str] | None) -> bool:
        if existing is not None and existing == (path.stat().st_size, file_crc32c(path)):
            with self._lock:
                self.skipped += 1
            return False
        self.store.put_file(key, path)
        with self._lock:
            self.uploaded += 1
        return True

    def wait(self) -> None:
        """Block until every upload so far is stored; raises the first failure."""
        with self._lock:
            futures, self._futures = self._futures, []
        for future in futures:
            exc = future.exception()
            if exc is not None:
                raise BackendError(f"could not upload an input: {exc}") from exc

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def prepare_task(task_dir: Path, work_dir: Path) -> Path:
    """The task folder to bundle for the VMs: its requirements resolved into wheels it carries
    (:func:`runner.backends.gcp.wheels.stage_task`), so no VM needs a package index to install
    them."""
    return stage_task(task_dir, work_dir)
