"""The Google Cloud deployment's combine: in the bucket, not on the runner.

Each output path follows the rule of :func:`runner.results.formats.plan_for`, as the local
combine does, with the same notes:

- Line formats: the first :data:`~runner.results.formats.TEXT_PROBE` bytes of each part are read
  (a ranged read); a part that is not text (:func:`~runner.results.formats.text_problem`) keeps
  the name per shard. Else the committed parts are composed in shard order
  (:func:`compose_tree`), a one-byte newline object after each part whose last byte is not a
  newline. That byte and, with declared headers, a part's first line come from the same read
  when the part is that short; else one more ranged read each. Compose cannot cut an object, so
  the parts whose first line is the header are re-uploaded without it; above
  :func:`runner.backends.gcp.strip.threshold` bytes the deployment's workers make those copies
  instead (:mod:`runner.backends.gcp.strip`).
- Gzip-compressed line formats: whether a part's content ends in a newline is known only by
  inflating it, so each part is streamed through the runner, in ranged reads, and decompressed
  as it comes (:func:`~runner.results.formats.scan_gzip`: memory flat, nothing written to disk,
  nothing uploaded). A part that is not whole gzip data or whose content is not text keeps the
  name per shard; else the parts are composed as they are (one gzip member each), a
  :data:`~runner.results.formats.NEWLINE_MEMBER` object after each whose content lacks a final
  newline.
- Anything else: each part is copied unchanged, server-side, to ``combined/<path>/<shard><suffix>``
  and listed in ``combined/<path>/manifest.json`` with its size and the bucket's crc32c.

:class:`BucketCombiner` is the :class:`~runner.results.parts.Combiner` the deployment hands in.
"""

from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from runner.backends.gcp.compose import (
    NEWLINE_KEY,
    READ_CHUNK,
    ObjectReader,
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
    NEWLINE_MEMBER,
    TEXT_PROBE,
    GzipScan,
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
    not_text,
    per_shard_note,
    plan_for,
    same_line,
    scan_gzip,
    text_problem,
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
PROBES_IN_FLIGHT = 16  # ranged reads of line-format parts' first bytes at once
# gzip parts streamed through the runner at once, each holding some 15 MiB (READ_CHUNK read,
# buffered and left over for zlib, 1 MiB decompressed): about 120 MiB in all
SCANS_AT_ONCE = 8


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
            probes: list[_Probe] = []
            if plan.method is Method.GZIP:
                plan, sources, note = job.gzip(parts, plan)
                if plan.method is Method.GZIP:
                    plans[rel] = (sources, note)
                    continue
            elif plan.method is Method.LINES:
                plan, probes = job.text(parts, plan, headers is None)
            if plan.method is Method.PER_SHARD:
                combined.objects.extend(job.per_shard(target, rel, parts, plan))
                note = per_shard_note(rel, len(parts), plan.why)
                combined.add(rel, f"{target}{rel}/{MANIFEST}", note)
                continue
            plans[rel] = job.lines(rel, parts, plan, probes, headers is None, warn)
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


@dataclass(frozen=True)
class _Probe:
    """What the first ``TEXT_PROBE + 1`` bytes of a line-format part tell."""

    problem: str | None = None  # why it is not text (text_problem); None: it is
    first: bytes | None = None  # its first line, newline included, when the probe holds it
    ends: bool = True  # it ends in a newline or is empty (its last byte read if past the probe)


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
        self._counting = threading.Lock()  # reads in flight add to traffic.downloaded

    def size(self, key: str) -> int:
        return self.listing.get(key, (0, ""))[0]

    def _count(self, downloaded: int) -> None:
        with self._counting:
            self.traffic.downloaded += downloaded

    def text(self, parts: list[Part], plan: Plan, undeclared: bool) -> tuple[Plan, list[_Probe]]:
        """A line format's rule once the first bytes of each part are read: kept per shard when
        one is not text (:func:`~runner.results.formats.text_problem`), else ``plan``; and what
        each part's read told (its first line is kept only where it is looked at)."""
        want_first = plan.headed and (plan.strip_headers or undeclared)
        probes: list[_Probe] = []
        with ThreadPoolExecutor(PROBES_IN_FLIGHT, thread_name_prefix="probe") as pool:
            read = pool.map(lambda p: self._probe(p, want_first), parts)
            for part, probe in zip(parts, read, strict=True):
                if probe.problem is not None:
                    pool.shutdown(cancel_futures=True)
                    return not_text(part.shard, probe.problem), []
                probes.append(probe)
        return plan, probes

    def _probe(self, part: Part, want_first: bool) -> _Probe:
        """Read a part's first ``TEXT_PROBE + 1`` bytes (one more: is the probe all of it?) and,
        when they are not all of it, its last byte."""
        size = self.size(part.key)
        if size == 0:
            return _Probe(first=b"")
        read = Traffic()  # this thread's: self._count adds it
        head = first_bytes(self.store, part.key, min(size, TEXT_PROBE + 1), read)
        whole = len(head) <= TEXT_PROBE
        if problem := text_problem(head[:TEXT_PROBE], whole=whole):
            self._count(read.downloaded)
            return _Probe(problem)
        cut = head.find(b"\n")
        first = head[: cut + 1] if cut >= 0 else head if whole else None
        if whole:
            ends = head.endswith(b"\n")
        else:
            ends = ends_with_newline(self.store, part.key, size, read)
        self._count(read.downloaded)
        return _Probe(first=first if want_first else None, ends=ends)

    def lines(
        self,
        rel: str,
        parts: list[Part],
        plan: Plan,
        probes: list[_Probe],
        undeclared: bool,
        warn: Warn,
    ) -> tuple[list[str], str]:
        """A line format's sources in order, and what is done with them (``probes``: what
        :meth:`text` read of each part)."""
        sources: list[str] = []
        firsts: list[bytes] = []
        header: bytes | None = None
        stripped = 0
        for n, (part, probe) in enumerate(zip(parts, probes, strict=True)):
            key, size = part.key, self.size(part.key)
            if plan.headed and (plan.strip_headers or undeclared):
                head = probe.first
                if head is None:  # longer than the probe
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
            if not probe.ends:  # keep the next part's first line on a line of its own
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

    def _newline_member(self) -> str:
        key = f"{self.scratch}{NEWLINE_KEY}.gz"
        if key not in self.made:
            self.store.put(key, NEWLINE_MEMBER)
            self.made.append(key)
        return key

    def gzip(self, parts: list[Part], plan: Plan) -> tuple[Plan, list[str], str]:
        """A gzip name's rule once each part was decompressed as a stream: kept per shard when
        one is not whole gzip data or its content is not text; else ``plan``, the sources to
        compose in order (a newline member after each part whose content lacks a final newline)
        and what is done with them."""
        present = [p for p in parts if self.size(p.key)]  # an empty part adds no member
        sources: list[str] = []
        newlines = 0
        with ThreadPoolExecutor(SCANS_AT_ONCE, thread_name_prefix="gzip-scan") as pool:
            scans = pool.map(self._scan, present)
            for part, scan in zip(present, scans, strict=True):
                if scan is None:
                    bad = not_gzip(part.shard)
                elif scan.problem is not None:
                    bad = not_gzip(part.shard, scan.problem)
                elif problem := scan.text_problem():
                    bad = not_text(part.shard, problem)
                else:
                    sources.append(part.key)
                    if scan.last not in (b"", b"\n"):  # the next part's first line on its own
                        sources.append(self._newline_member())
                        newlines += 1
                    continue
                pool.shutdown(cancel_futures=True)
                return bad, [], ""
        return plan, sources, gzip_note(len(present), newlines=newlines)

    def _scan(self, part: Part) -> GzipScan | None:
        """:func:`~runner.results.formats.scan_gzip` of a part streamed from the bucket (None:
        it is not gzip data)."""
        raw = ObjectReader(self.store, part.key, self.size(part.key))
        try:
            with io.BufferedReader(raw, READ_CHUNK) as src:
                if not is_gzip(src.peek(2)[:2]):
                    return None
                return scan_gzip(src, chunk=READ_CHUNK)
        finally:
            self._count(raw.downloaded)

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
