"""The Google Cloud deployment's combine: in the bucket, not on the runner.

Each output path follows the rule of :func:`runner.results.formats.plan_for`, as the local
combine does:

- Line formats: the committed parts are composed in shard order (:func:`compose_tree`). A part
  whose last byte is not a newline is followed by a one-byte newline object. The runner reads
  one byte of each part for that check; with declared headers it also reads each part's first
  line, and re-uploads the parts whose first line is the header without it (compose cannot cut
  an object), which is the only case where part bytes pass through the runner; above
  :func:`runner.backends.gcp.strip.threshold` bytes the deployment's workers make those copies
  instead (:mod:`runner.backends.gcp.strip`).
- Gzip-compressed line formats: the parts are composed as they are (one gzip member each),
  after a two-byte read of each shows it is gzip data.
- Anything else: each part is copied unchanged, server-side, to ``combined/<path>/<shard><suffix>``
  and listed in ``combined/<path>/manifest.json`` with its size and the bucket's crc32c.

:class:`BucketCombiner` is the :class:`~runner.results.parts.Combiner` the deployment hands in.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner.backends.gcp.compose import (
    NEWLINE_KEY,
    compose_tree,
    copy_to,
    ends_with_newline,
    first_bytes,
    first_line,
    strip_first_line,
)
from runner.backends.gcp.strip import strip_on_workers, threshold
from runner.results.formats import (
    MANIFEST,
    Method,
    Plan,
    differing,
    gzip_note,
    header_of,
    header_warning,
    is_gzip,
    kept_name,
    lines_note,
    manifest_json,
    mismatch_warning,
    not_gzip,
    per_shard_note,
    plan_for,
    same_line,
)
from runner.results.parts import (
    Combined,
    OnWorkers,
    Part,
    StripJob,
    StripRunner,
    Traffic,
    Warn,
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
            workers.listen,
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


COPIES_IN_FLIGHT = 16  # server-side copies of per-shard parts at once


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
    """Combine each output path's parts under ``runs/<run>/combined/``.

    With declared headers the parts whose first line is the header are first copied without
    it: by ``strip`` (the workers) when those copies add up to more than ``strip_threshold``
    bytes, else by the runner.
    """
    target = Layout.combined(manifest.run_id)
    combined = Combined(files=[], shards=0, missing=0)
    job = _Bucket(store, manifest.run_id, combined.traffic)
    plans: dict[str, tuple[list[str], str]] = {}
    try:
        for rel in sorted(groups):
            parts = groups[rel]
            plan = plan_for(rel, headers)
            if plan.method is Method.GZIP:
                sources, bad = job.gzip(parts)
                if bad is None:
                    plans[rel] = (sources, gzip_note(len(sources)))
                    continue
                plan = not_gzip(bad)
            if plan.method is Method.PER_SHARD:
                combined.objects.extend(job.per_shard(target, rel, parts, plan))
                note = per_shard_note(rel, len(parts), plan.why)
                combined.add(rel, f"{target}{rel}/{MANIFEST}", note)
                continue
            plans[rel] = job.lines(rel, parts, plan, headers is None, warn)
        if job.jobs and strip is not None and sum(j.size for j in job.jobs) > strip_threshold:
            strip(job.jobs)
        else:
            for one in job.jobs:
                strip_first_line(store, one.source, one.skip, one.target, combined.traffic)
        for rel, (sources, note) in plans.items():
            if not sources:
                store.put(target + rel, b"")
            else:
                compose_tree(store, sources, target + rel, f"{job.scratch}tree/{rel}/", job.traffic)
            combined.add(rel, target + rel, note)
    finally:
        for key in job.made:
            store.delete(key)
    return combined


class _Bucket:
    """One combine in the bucket: the parts' sizes, the header-less copies to make, scratch."""

    def __init__(self, store: GcsStore, run_id: str, traffic: Traffic):
        self.store = store
        self.run_id = run_id
        self.traffic = traffic
        self.scratch = f"runs/{run_id}/combine-scratch/"
        # {key: (size, crc32c)} of every part, in one paged listing
        self.listing = store.checksums(Layout.shards_prefix(run_id))
        self.made: list[str] = []  # scratch objects, deleted at the end
        self.jobs: list[StripJob] = []  # header-less copies to make

    def size(self, key: str) -> int:
        return self.listing.get(key, (0, ""))[0]

    def lines(
        self, rel: str, parts: list[Part], plan: Plan, undeclared: bool, warn: Warn
    ) -> tuple[list[str], str]:
        """A line format's sources in order, and what is done with them."""
        sources: list[str] = []
        firsts: list[bytes] = []
        header: bytes | None = None
        stripped = 0
        for n, part in enumerate(parts):
            key, size = part.key, self.size(part.key)
            if plan.headed and (plan.strip_headers or undeclared):
                head = first_line(self.store, part.key, size, self.traffic)
                firsts.append(head)
                if header is None and head:
                    header = head
                elif plan.strip_headers and head and same_line(head, header or b""):
                    key, size = self._without_header(rel, n, part, head)
                    stripped += 1
            if size == 0:
                continue
            sources.append(key)
            if not ends_with_newline(self.store, part.key, self.size(part.key), self.traffic):
                sources.append(self._newline())
        if plan.strip_headers and (odd := differing(firsts)):
            shards = [parts[n].shard for n in odd]
            warn(mismatch_warning(rel, header_of(firsts) or b"", shards, firsts[odd[0]]))
        if undeclared and plan.headed and (hint := header_warning(firsts, rel)):
            warn(hint)
        return sources, lines_note(len(parts), stripped > 0)

    def _without_header(self, rel: str, n: int, part: Part, head: bytes) -> tuple[str, int]:
        """Plan the copy of a part without its header line: (its key, its size)."""
        full = self.size(part.key)
        if not head.endswith(b"\n") and len(head) < full:
            raise TaskError(
                f"{part.key} starts with a line over 64 KiB; a header? set"
                " `[combine] headers = false` if the parts have none",
                run_id=self.run_id,
            )
        if len(head) >= full:
            return part.key, 0  # the part is its header alone
        key = f"{self.scratch}body/{n:06d}/{rel}"
        self.jobs.append(StripJob(part.key, len(head), key, full - len(head)))
        self.made.append(key)
        return key, full - len(head)

    def _newline(self) -> str:
        key = self.scratch + NEWLINE_KEY
        if key not in self.made:
            self.store.put(key, b"\n")
            self.made.append(key)
        return key

    def gzip(self, parts: list[Part]) -> tuple[list[str], str | None]:
        """The parts to compose as gzip members; or the first shard whose part is not gzip."""
        sources = []
        for part in parts:
            if self.size(part.key) == 0:
                continue  # adds no member
            if not is_gzip(first_bytes(self.store, part.key, 2, self.traffic)):
                return [], part.shard
            sources.append(part.key)
        return sources, None

    def per_shard(self, target: str, rel: str, parts: list[Part], plan: Plan) -> list[str]:
        """Copy each part unchanged, in the bucket, under ``combined/<rel>/``; write the
        manifest. Returns the copies' keys."""
        folder = f"{target}{rel}/"
        keys = [folder + kept_name(p.shard, rel) for p in parts]
        bucket = self.store.bucket_name
        with ThreadPoolExecutor(COPIES_IN_FLIGHT, thread_name_prefix="copy") as pool:
            list(pool.map(lambda p, k: copy_to(self.store, p.key, bucket, k), parts, keys))
        listed = [
            {
                "shard": p.shard,
                "index": p.index,
                "file": kept_name(p.shard, rel),
                "size": self.listing.get(p.key, (0, ""))[0],
                "crc32c": self.listing.get(p.key, (0, ""))[1],
            }
            for p in parts
        ]
        self.store.put(folder + MANIFEST, manifest_json(rel, plan.why, listed))
        return keys
