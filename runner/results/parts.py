"""What combining works on and hands back: committed parts, the result, and the combiner port.

A run's committed outputs are :class:`Part` objects grouped by their path relative to the
attempt's ``out/`` (:func:`committed_parts`). A :class:`Combiner` turns each group into its
combined form where the store keeps them, by the rule :mod:`runner.results.formats` gives for the
name: a backend hands its own in on the deployment (Google Cloud composes in the bucket);
:mod:`runner.results.combine` works on this machine when none is given. Nothing here knows a
backend.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Protocol

from runner.engine import runs
from worker import defaults
from worker.errors import ConfigError, NotFound
from worker.protocol import Layout, Manifest, ShardResult
from worker.store import Store

if TYPE_CHECKING:
    from runner.engine.watch import Watcher
    from worker.queue import EventBus, WorkQueue

Warn = Callable[[str], None]  # a warning, one line
Say = Callable[[str], None]  # narration, one line
# (helper manifest, shards, its events opened before publishing) -> its watcher
MakeWatcher = Callable[[Manifest, int, "EventBus"], "Watcher"]
# In a local --out folder, RESULT_MARK: which run's result it holds, and the files that
# result wrote there (worker.bundle leaves such a folder out of a task's bundle).
RESULT_MARK = defaults.RESULT_MARK


@dataclass(frozen=True)
class OutTarget:
    """Where ``--out`` asks for a copy of the combined result: a local folder or a bucket path."""

    path: Path | None = None
    bucket: str | None = None
    prefix: str = ""  # object-name prefix in ``bucket``, ending in "/" unless empty
    force: bool = False  # replace another run's result in ``path``

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"gs://{self.bucket}/{self.prefix}"

    def where(self, rel: str) -> str:
        """Where the combined file ``rel`` is copied to."""
        if self.path is not None:
            return str(self.path / rel)
        return f"gs://{self.bucket}/{self.prefix}{rel}"


def outside_store(store: Path, run_id: str | None, target: OutTarget | None) -> OutTarget | None:
    """``target``, or None when it is the run's own combined folder in the local ``store``
    (where the result goes anyway: copying it onto itself failed). Any other folder in the
    store is refused: the copy would write among the store's own files (another run's result,
    its queue), and the next bundle of a task folder holding it would leave it out."""
    if target is None or target.path is None:
        return target
    root = store.resolve()
    if run_id is not None and target.path == root / Layout.combined(run_id).rstrip("/"):
        return None
    if target.path == root or root in target.path.parents:
        where = "the store" if target.path == root else f"inside the store {root}"
        mine = f" (the result is in {root / Layout.combined(run_id)} anyway)" if run_id else ""
        raise ConfigError(f"--out {target.path} is {where}; give a folder outside it{mine}")
    return target


def check_out(
    out: str | Path | None, *, cloud: bool, run_id: str | None = None, force: bool = False
) -> OutTarget | None:
    """Validate ``--out`` before anything runs; raises ConfigError with the fix.

    A local folder must be writable (a file is made and removed in it, or in its nearest
    existing parent) and must not hold another run's result (:func:`result_owner`) unless
    ``force``; ``run_id`` is the run whose result goes there (None: a run not made yet).
    """
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
    _probe(path)
    owner = result_owner(path)
    if owner is not None and owner != run_id and not force:
        raise ConfigError(
            f"--out {path} holds the result of run {owner} ({RESULT_MARK}); give another folder"
            + (", or --force to replace it" if run_id is not None else " or remove that one")
        )
    return OutTarget(path=path.resolve(), force=force)


def _probe(path: Path) -> None:
    """Raise ConfigError unless a file can be made in ``path`` or its nearest existing parent
    (a read-only mount, ``/proc``, a folder of someone else's say no)."""
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    if not parent.is_dir():
        raise ConfigError(f"--out {path}: {parent} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(prefix=".cflow-probe-", dir=parent):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {path}: {parent} is not writable ({exc.strerror})") from None


def result_owner(folder: Path) -> str | None:
    """The run whose result a local ``--out`` folder holds (None: none, as far as cflow knows)."""
    return _read_mark(folder)[0]


def result_files(folder: Path) -> list[str]:
    """The files (relative paths) the result held in a local ``--out`` folder wrote there."""
    return _read_mark(folder)[1]


def _read_mark(folder: Path) -> tuple[str | None, list[str]]:
    try:
        data = json.loads((folder / RESULT_MARK).read_text(encoding="utf-8"))
        return str(data["run_id"]), [str(f) for f in data.get("files", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


def mark_result(folder: Path, run_id: str, files: list[str]) -> None:
    """Record in a local ``--out`` folder that it holds ``run_id``'s result, these files."""
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"run_id": run_id, "files": sorted(files)}, indent=1) + "\n"
    (folder / RESULT_MARK).write_text(text, encoding="utf-8")


def refuse_others(folder: Path, run_id: str, rels: list[str]) -> None:
    """Raise ConfigError, in one line naming the first, when writing the files ``rels`` into a
    local ``--out`` folder would replace something no combine of this run wrote there.

    What the folder's :data:`RESULT_MARK` lists is a combine's own, replaced freely (the caller
    has refused another run's result already, unless ``--force``); anything else in the way of
    a file of the result (a file of that name, a file where its folder goes, a folder holding
    other files where it goes, a link) is the user's and is never written over. Asked before
    the folder is touched.
    """
    owned = set(result_files(folder))
    clashes: list[Path] = []
    for rel in sorted(rels):
        clash = _in_the_way(folder, PurePosixPath(rel), owned)
        if clash is not None and clash not in clashes:  # a file where a folder goes: once
            clashes.append(clash)
    if not clashes:
        return
    more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
    raise ConfigError(
        f"--out {folder}: {clashes[0]}{more} is in the way of the combined result and no combine"
        f" of run {run_id} wrote it; it is left as it is: give another folder (`runner combine"
        f" {run_id} --out DIR`), or move it away and combine again"
    )


def _in_the_way(folder: Path, rel: PurePosixPath, owned: set[str]) -> Path | None:
    """What of the user's stands where ``folder/rel`` is written (None: nothing)."""
    for ancestor in [*reversed(rel.parents[:-1]), rel]:  # "a", "a/b", ..., rel itself
        path = folder / ancestor
        if path.is_symlink():  # a combine writes none, and a copy would go where it points
            return path
        if path.exists() and not path.is_dir():
            return None if str(ancestor) in owned else path  # owned: removed before the copy
        if not path.exists():
            return None
    for inside in path.rglob("*"):  # a folder where the file goes: only the result's files?
        if inside.is_symlink() or (
            not inside.is_dir() and inside.relative_to(folder).as_posix() not in owned
        ):
            return path
    return None


def clear_result(folder: Path) -> None:
    """Remove the files an earlier result wrote in a local ``--out`` folder (only those, and
    the folders they leave empty): nothing of it mixes with the next one."""
    base = folder.resolve()
    for rel in result_files(folder):
        path = (base / rel).resolve()
        if base not in path.parents:  # a hand-edited mark naming something outside
            continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            path.unlink()
        for parent in path.parents:
            if parent == base:
                break
            with contextlib.suppress(OSError):  # not empty: something else lives there
                parent.rmdir()
    (folder / RESULT_MARK).unlink(missing_ok=True)


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
    late: int = 0  # of those, committed by an attempt that ended after the run was cancelled
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
    listen: Callable[[str], EventBus]  # a helper run's events, opened before it is published
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


def committed_parts(
    store: Store, manifest: Manifest
) -> tuple[dict[str, list[Part]], int, int, int]:
    """Committed outputs grouped by relative path, in shard order; plus (committed, missing,
    late). A cancelled run's result holds only attempts that ended before the cancel: one that
    ended after it and still committed (in the moment the cancel was being written) is left out,
    counted missing and ``late``."""
    run_id = manifest.run_id
    done = runs.committed(store, run_id)
    groups: dict[str, list[Part]] = {}
    missing = late = 0
    batch: list[tuple[str, int]] = []  # (commit record, shard index)

    def read(keys: list[tuple[str, int]]) -> None:  # one query (or reads) per 1000 shards
        nonlocal late
        found = store.get_many([key for key, _ in keys])
        for key, index in keys:
            if key not in found:  # removed since it was listed (a concurrent `runner rm`)
                raise NotFound(f"no object {key}")
            result = ShardResult.from_json(found[key])
            if manifest.cancelled_at is not None and result.finished_at > manifest.cancelled_at:
                late += 1
                continue
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
    return groups, len(done) - late, missing + late, late


def local_parts(store: Store, parts: list[Part], work: Path, traffic: Traffic) -> Iterator[Path]:
    """Each part as a local file: where the store keeps it, else downloaded under ``work``."""
    for n, part in enumerate(parts):
        local = store.local_path(part.key)
        if local is not None and local.is_file():
            yield local
            continue
        dest = work / f"{n:06d}" / part.rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(part.key, dest)
        traffic.downloaded += dest.stat().st_size
        yield dest
