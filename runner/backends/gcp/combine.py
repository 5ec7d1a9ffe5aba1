"""The Google Cloud deployment's combine: concatenated in the bucket, not on the runner.

Per output path, the committed parts are composed in shard order (:func:`compose_tree`). A part
whose last byte is not a newline is followed by a one-byte newline object, as the local combine
writes one. The runner reads one byte of each part for that check; with declared headers it also
reads each part's first line, and re-uploads the parts after the first without it (compose
cannot cut an object), which is the only case where part bytes pass through the runner; above
:func:`runner.backends.gcp.strip.threshold` bytes the deployment's workers make those copies
instead (:mod:`runner.backends.gcp.strip`). :class:`BucketCombiner` is the
:class:`~runner.results.parts.Combiner` the deployment hands in.
"""

from __future__ import annotations

from pathlib import Path

from runner.backends.gcp.compose import (
    NEWLINE_KEY,
    compose_tree,
    copy_to,
    ends_with_newline,
    first_line,
    sizes,
    strip_first_line,
)
from runner.backends.gcp.strip import strip_on_workers, threshold
from runner.results.parts import (
    Combined,
    OnWorkers,
    Part,
    StripJob,
    StripRunner,
    Traffic,
    Warn,
    headed,
    header_warning,
)
from worker.backends.gcp.gcs import GcsStore
from worker.errors import TaskError
from worker.protocol import Layout, Manifest
from worker.store import Store


class BucketCombiner:
    """Composes parts in the bucket; big header-less copies are made on the workers."""

    def concatenate(
        self,
        store: Store,
        manifest: Manifest,
        groups: dict[str, list[Part]],
        *,
        headers: bool | None,
        warn: Warn,
        work: Path,
        workers: OnWorkers | None,
    ) -> Combined:
        """:func:`combine_in_bucket`, with the header-less copies on ``workers`` when given and
        they add up to more than :func:`~runner.backends.gcp.strip.threshold` bytes."""
        strip = None if workers is None else _strip_on(workers, store, manifest.run_id)
        return combine_in_bucket(
            _gcs(store),
            manifest,
            groups,
            headers=headers,
            warn=warn,
            strip=strip,
            strip_threshold=threshold(),
        )

    def copy_to_bucket(self, store: Store, key: str, bucket: str, name: str) -> None:
        """A server-side copy (``--out gs://...``): no byte passes through the runner."""
        copy_to(_gcs(store), key, bucket, name)


def _strip_on(workers: OnWorkers, store: Store, run_id: str) -> StripRunner:
    """Header-less copies made by a helper run on the deployment's workers."""

    def strip(jobs: list[StripJob]) -> None:
        workers.say(f"copying {len(jobs)} parts without their headers on the workers")
        strip_on_workers(
            store,
            workers.queue,
            workers.make_watcher,
            run_id=run_id,
            bucket=_gcs(store).bucket_name,
            jobs=jobs,
            poll_seconds=workers.poll_seconds,
        )

    return strip


def _gcs(store: Store) -> GcsStore:
    if not isinstance(store, GcsStore):  # the deployment hands this combiner its own store
        raise TypeError(f"combining in a bucket needs a GcsStore, not {type(store).__name__}")
    return store


def combine_in_bucket(
    store: GcsStore,
    manifest: Manifest,
    groups: dict[str, list[Part]],
    *,
    headers: bool | None,
    warn: Warn,
    strip: StripRunner | None = None,
    strip_threshold: int = 0,
) -> Combined:
    """Compose each output path's parts into ``runs/<run>/combined/<path>``.

    With declared headers the parts after the first are first copied without their header: by
    ``strip`` (the workers) when those copies add up to more than ``strip_threshold`` bytes,
    else by the runner.
    """
    run_id = manifest.run_id
    target = Layout.combined(run_id)
    scratch = f"runs/{run_id}/combine-scratch/"
    traffic = Traffic()
    combined = Combined(files=[], shards=0, missing=0, traffic=traffic)
    size_of = sizes(store, Layout.shards_prefix(run_id))
    newline = scratch + NEWLINE_KEY
    made: list[str] = []
    plans: dict[str, list[str]] = {}
    jobs: list[StripJob] = []
    try:
        for rel in sorted(groups):
            is_headed = headed(rel)
            sources: list[str] = []
            firsts: list[bytes] = []
            for n, part in enumerate(groups[rel]):
                full = size_of.get(part.key, 0)
                key, size = part.key, full
                if is_headed and headers is not False:
                    head = first_line(store, part.key, full, traffic)
                    firsts.append(head)
                    if headers and n > 0 and head:
                        if not head.endswith(b"\n") and len(head) < full:
                            raise TaskError(
                                f"{part.key} starts with a line over 64 KiB; a header? set"
                                " `[combine] headers = false` if the parts have none",
                                run_id=run_id,
                            )
                        if len(head) >= full:
                            continue  # the part is its header alone
                        key = f"{scratch}body/{n:06d}/{rel}"
                        size = full - len(head)
                        jobs.append(StripJob(part.key, len(head), key, size))
                        made.append(key)
                if size == 0:
                    continue
                sources.append(key)
                if not ends_with_newline(store, part.key, full, traffic):
                    if newline not in made:
                        store.put(newline, b"\n")
                        made.append(newline)
                    sources.append(newline)
            if headers is None and is_headed and (hint := header_warning(firsts, rel)):
                warn(hint)
            plans[rel] = sources
        if jobs and strip is not None and sum(j.size for j in jobs) > strip_threshold:
            strip(jobs)
        else:
            for job in jobs:
                strip_first_line(store, job.source, job.skip, job.target, traffic)
        for rel, sources in plans.items():
            if not sources:
                store.put(target + rel, b"")
            else:
                compose_tree(store, sources, target + rel, f"{scratch}tree/{rel}/", traffic)
            combined.files.append(target + rel)
    finally:
        for key in made:
            store.delete(key)
    return combined
