"""Combining a run's parts on this machine (:class:`LocalCombiner`, the combiner where the
deployment names none): parts the store keeps as local files are read in place, others are
downloaded first, and each name is joined by the rule of :mod:`runner.results.formats` once
its parts were looked at: a gzip part whole and its content text (each part's content ending
in a newline), a line format's part text; else kept per shard with a manifest."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner.results.formats import (
    MANIFEST,
    NEWLINE_MEMBER,
    Method,
    Plan,
    differing,
    file_sha256,
    file_text_problem,
    gzip_note,
    header_of,
    header_warning,
    kept_name,
    lines_note,
    manifest_json,
    mismatch_warning,
    not_gzip,
    not_text,
    per_shard_note,
    plan_for,
    same_line,
    scan_gzip_file,
)
from runner.results.parts import Combined, OnWorkers, Part, Warn, local_parts
from worker.errors import ConfigError
from worker.protocol import Layout, Manifest
from worker.store import Store

# gzip parts decompressed at once to look at their content (zlib lets go of the GIL meanwhile)
SCANS_AT_ONCE = os.cpu_count() or 1


class LocalCombiner:
    """Combines on this machine: parts the store keeps as local files are read in place,
    others are downloaded first."""

    def concatenate(
        self,
        store: Store,
        manifest: Manifest,
        groups: dict[str, list[Part]],
        *,
        headers: bool | None,
        warn: Warn,
        work: Path,
        workers: OnWorkers | None = None,
    ) -> Combined:
        """Combine each path's parts under ``runs/<run>/combined/`` by the rule of
        :func:`~runner.results.formats.plan_for` (``workers``: not needed here)."""
        target = Layout.combined(manifest.run_id)
        combined = Combined(files=[], shards=0, missing=0)
        for rel in sorted(groups):
            parts = groups[rel]
            paths = list(local_parts(store, parts, work / "in", combined.traffic))
            plan = plan_for(rel, headers)
            newline_after: list[bool] = []  # GZIP: the parts whose content lacks a final newline
            if plan.method is Method.GZIP:
                plan, newline_after = _check_gzip(parts, paths, plan)
            elif plan.method is Method.LINES:
                plan = _check_text(parts, paths, plan)
            if plan.method is Method.PER_SHARD:
                _keep_per_shard(store, target + rel, list(zip(parts, paths, strict=True)), plan)
                combined.objects.extend(f"{target}{rel}/{kept_name(p.shard, rel)}" for p in parts)
                note = per_shard_note(rel, len(parts), plan.why)
                combined.add(rel, f"{target}{rel}/{MANIFEST}", note)
                continue
            staged = work / "combined" / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            if plan.method is Method.GZIP:
                joined = join_bytes(paths, staged, newline_after)
                note = gzip_note(joined, newlines=sum(newline_after))
            else:
                note = _lines(rel, parts, paths, staged, plan, headers is None, warn)
            _make_room(store, target + rel)
            store.put_file(target + rel, staged)
            combined.add(rel, target + rel, note)
        return combined

    def copy_to_bucket(self, store: Store, key: str, bucket: str, name: str) -> None:
        """Refused: a Cloud Storage path needs the Google Cloud backend."""
        raise ConfigError(
            f"--out gs://{bucket}/{name} is a Cloud Storage path; it needs the Google Cloud backend"
        )


def _keep_per_shard(store: Store, key: str, parts: list[tuple[Part, Path]], plan: Plan) -> None:
    """Copy each part unchanged to ``<key>/<shard><suffix>``, then write ``<key>/manifest.json``
    (``key``: the name's place under ``runs/<run>/combined/``)."""
    folder = key + "/"
    if store.exists(key):  # an earlier combine joined this name into one file
        store.delete(key)
    listed = []
    for part, path in parts:
        name = kept_name(part.shard, part.rel)
        store.put_file(folder + name, path)
        size, digest = path.stat().st_size, file_sha256(path)
        listed.append(
            {"shard": part.shard, "index": part.index, "file": name, "size": size, "sha256": digest}
        )
    store.put(folder + MANIFEST, manifest_json(parts[0][0].rel, plan.why, listed))


def _make_room(store: Store, key: str) -> None:
    """Remove a folder an earlier combine left where this one writes a file."""
    for old in list(store.list(key + "/")):
        store.delete(old)
    local = store.local_path(key)
    if local is not None and local.is_dir():  # the store's empty folders
        shutil.rmtree(local, ignore_errors=True)


def _check_gzip(parts: list[Part], paths: list[Path], plan: Plan) -> tuple[Plan, list[bool]]:
    """A gzip name's rule once its parts are read (:func:`~runner.results.formats.scan_gzip`):
    kept per shard when one is not whole gzip data or its content is not text; else ``plan``
    and, per part, whether its content lacks a final newline (a newline member goes after it).
    """
    with ThreadPoolExecutor(SCANS_AT_ONCE, thread_name_prefix="gzip-scan") as pool:
        scans = list(pool.map(scan_gzip_file, paths))
    for part, scan in zip(parts, scans, strict=True):
        if scan is None:
            return not_gzip(part.shard), []
        if scan.problem is not None:
            return not_gzip(part.shard, scan.problem), []
        if problem := scan.text_problem():
            return not_text(part.shard, problem), []
    return plan, [scan is not None and scan.last not in (b"", b"\n") for scan in scans]


def _check_text(parts: list[Part], paths: list[Path], plan: Plan) -> Plan:
    """A line format's rule once the start of each part is read: kept per shard when one is
    not text (:func:`~runner.results.formats.text_problem`), else ``plan``."""
    for part, path in zip(parts, paths, strict=True):
        if problem := file_text_problem(path):
            return not_text(part.shard, problem)
    return plan


def _lines(
    rel: str,
    parts: list[Part],
    paths: list[Path],
    staged: Path,
    plan: Plan,
    undeclared: bool,
    warn: Warn,
) -> str:
    """Concatenate a line format's parts into ``staged``; warn of what a reader should know."""
    firsts, stripped = concatenate(paths, staged, strip_headers=plan.strip_headers)
    if plan.strip_headers and (odd := differing(firsts)):
        header = header_of(firsts) or b""
        shards = [parts[n].shard for n in odd]
        warn(mismatch_warning(rel, header, shards, firsts[odd[0]]))
    if undeclared and plan.headed and (hint := header_warning(firsts, rel)):
        warn(hint)
    return lines_note(len(parts), stripped > 0)


def concatenate(
    paths: Iterator[Path] | list[Path], dest: Path, *, strip_headers: bool
) -> tuple[list[bytes], int]:
    """Concatenate line-format files into ``dest``, each part ending in a newline.

    With ``strip_headers`` a later part's first line is left out when it is the header (the
    first line of the first part that has one); a part whose first line differs keeps it.
    Returns each part's first line and how many were left out.
    """
    firsts: list[bytes] = []
    header: bytes | None = None
    stripped = 0
    with dest.open("wb") as dst:
        for path in paths:
            with path.open("rb") as src:
                first = src.readline()
                firsts.append(first)
                if header is None and first:
                    header, keep = first, True
                else:
                    keep = not (strip_headers and first and same_line(first, header or b""))
                stripped += not keep
                last = b""
                if keep and first:
                    dst.write(first)
                    last = first[-1:]
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    last = chunk[-1:]
                if last and last != b"\n":  # keep the next part's first line on a line of its own
                    dst.write(b"\n")
    return firsts, stripped


def join_bytes(paths: list[Path], dest: Path, newline_after: list[bool] | None = None) -> int:
    """Concatenate files byte for byte (gzip members), with a
    :data:`~runner.results.formats.NEWLINE_MEMBER` after each part ``newline_after`` marks;
    returns how many parts were not empty."""
    joined = 0
    with dest.open("wb") as dst:
        for n, path in enumerate(paths):
            if path.stat().st_size == 0:
                continue
            with path.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            if newline_after and newline_after[n]:  # the next part's first line on its own
                dst.write(NEWLINE_MEMBER)
            joined += 1
    return joined
