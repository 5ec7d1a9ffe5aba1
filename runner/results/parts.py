"""What combining works on and hands back: committed parts, the result, and the combiner port.

A run's committed outputs are :class:`Part` objects grouped by their path relative to the
attempt's ``out/`` (:func:`committed_parts`). A :class:`Combiner` turns each group into its
combined form where the store keeps them, by the rule :mod:`runner.results.formats` gives for the
name: a backend hands its own in on the deployment (Google Cloud composes in the bucket);
:mod:`runner.results.combine` works on this machine when none is given. Nothing here knows a
backend.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from runner.engine import runs
from worker.errors import ConfigError, NotFound
from worker.protocol import Layout, Manifest, ShardResult
from worker.store import Store

if TYPE_CHECKING:
    from runner.engine.watch import Watcher
    from worker.queue import WorkQueue

Warn = Callable[[str], None]  # a warning, one line
Say = Callable[[str], None]  # narration, one line
MakeWatcher = Callable[[Manifest, int], "Watcher"]  # (helper manifest, shards) -> its watcher


@dataclass(frozen=True)
class OutTarget:
    """Where ``--out`` asks for a copy of the combined result: a local folder or a bucket path."""

    path: Path | None = None
    bucket: str | None = None
    prefix: str = ""  # object-name prefix in ``bucket``, ending in "/" unless empty

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"gs://{self.bucket}/{self.prefix}"

    def where(self, rel: str) -> str:
        """Where the combined file ``rel`` is copied to."""
        if self.path is not None:
            return str(self.path / rel)
        return f"gs://{self.bucket}/{self.prefix}{rel}"


def check_out(out: str | Path | None, *, cloud: bool) -> OutTarget | None:
    """Validate ``--out`` before anything runs; raises ConfigError with the fix."""
    if out is None:
        return None
    text = str(out)
    if text.startswith("gs://"):
        if not cloud:
            raise ConfigError(
                f"--out {text} is a Cloud Storage path; it needs the Google Cloud backend"
            )
        bucket, _, prefix = text[len("gs://") :].partition("/")
        if not bucket:
            raise ConfigError(f"--out {text} names no bucket; write gs://BUCKET/PATH/")
        return OutTarget(bucket=bucket, prefix=prefix.rstrip("/") + "/" if prefix else "")
    if "://" in text:
        raise ConfigError(f"--out {text}: only a local folder or gs://BUCKET/PATH is supported")
    path = Path(text).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} exists and is not a folder; give a folder to write into")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {path}: {parent} is not writable")
    return OutTarget(path=path.resolve())


@dataclass
class Traffic:
    """Bytes the runner moved while combining: what the benchmark reports."""

    downloaded: int = 0  # bytes read from the parts (first lines, last bytes, header-less bodies)
    uploaded: int = 0  # bytes written back (header-less bodies)
    compose_calls: int = 0
    downloaded_for_copy: int = 0  # bytes of the combined result copied to ``--out DIR``

    def to_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class Combined:
    """A combine's result: one file per output name, what was done with it, where copies went.

    ``files`` holds one key per name under ``runs/<run>/combined/``: the combined file, or for a
    name kept per shard its ``manifest.json``; ``objects`` every key the combine wrote (the
    files and the per-shard copies); ``how`` says per name what was done.
    """

    files: list[str]  # one key per output name (a combined file or a manifest.json)
    shards: int  # committed shards combined
    missing: int  # shards with no committed result (failed or unfinished)
    written: list[str] = field(default_factory=list)  # where --out copies of ``files`` went
    traffic: Traffic = field(default_factory=Traffic)
    objects: list[str] = field(default_factory=list)  # every key written, ``files`` included
    how: dict[str, str] = field(default_factory=dict)  # output name -> what was done with it

    def add(self, rel: str, key: str, how: str) -> None:
        """Record the combined form of the output name ``rel``: its key and what was done."""
        self.files.append(key)
        self.objects.append(key)
        self.how[rel] = how


@dataclass(frozen=True)
class Part:
    """One committed output file of one shard."""

    rel: str  # path relative to the attempt's out/
    key: str  # the committed object
    shard: str = ""  # the shard's id
    index: int = 0  # the shard's index


@dataclass(frozen=True)
class StripJob:
    """Copy ``source`` without its first ``skip`` bytes to ``target`` (a header-less part)."""

    source: str
    skip: int
    target: str
    size: int  # bytes the copy will hold


StripRunner = Callable[[list[StripJob]], None]  # makes the copies somewhere other than here


@dataclass(frozen=True)
class OnWorkers:
    """The means to run a helper run on the deployment's own workers and wait for it: what a
    combiner may use to move work next to the data instead of through this machine."""

    queue: WorkQueue
    make_watcher: MakeWatcher  # a watcher that starts workers for the helper run
    poll_seconds: float  # the watch loop's pace
    say: Say  # narration of what is done there


class Combiner(Protocol):
    """Turns each path's committed parts into their combined form, where the store keeps them."""

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
        """Write ``runs/<run>/combined/<path>`` for every path in ``groups``, parts in shard
        order, by the rule of :func:`runner.results.formats.plan_for`: lines concatenated, gzip
        members concatenated, or each part copied unchanged under ``combined/<path>/`` with a
        manifest.

        ``headers``: drop each later ``.csv``/``.tsv`` part's first line when it is the header
        (None: undeclared, keep it and ``warn`` when every part starts alike). ``work`` is a
        scratch folder for this call; ``workers``, when given, may do the heavy copying.
        """
        ...

    def copy_to_bucket(self, store: Store, key: str, bucket: str, name: str) -> None:
        """Copy the object ``key`` to ``gs://bucket/name`` (``--out gs://...``)."""
        ...


def committed_parts(store: Store, manifest: Manifest) -> tuple[dict[str, list[Part]], int, int]:
    """Committed outputs grouped by relative path, in shard order; plus (committed, missing)."""
    run_id = manifest.run_id
    done = runs.committed(store, run_id)
    groups: dict[str, list[Part]] = {}
    missing = 0
    batch: list[tuple[str, int]] = []  # (commit record, shard index)

    def read(keys: list[tuple[str, int]]) -> None:  # one query (or reads) per 1000 shards
        found = store.get_many([key for key, _ in keys])
        for key, index in keys:
            if key not in found:  # removed since it was listed (a concurrent `runner rm`)
                raise NotFound(f"no object {key}")
            result = ShardResult.from_json(found[key])
            prefix = Layout.outputs(run_id, result.shard_id, result.attempt)
            for rel in result.outputs:
                part = Part(rel, prefix + rel, result.shard_id, index)
                groups.setdefault(rel, []).append(part)

    for shard in runs.iter_shards(store, run_id):
        if shard.id not in done:
            missing += 1
            continue
        batch.append((Layout.result(run_id, shard.id), shard.index))
        if len(batch) == 1000:
            read(batch)
            batch = []
    read(batch)
    return groups, len(done), missing
