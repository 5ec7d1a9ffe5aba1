"""Combining a run's outputs into one result per output name.

Only committed attempts are read, in shard order. Outputs at the same path relative to their
attempt's ``out/`` (``sub/a.csv`` and ``a.csv`` are two names) are combined by the rule of
:mod:`runner.results.formats`: line formats (csv, tsv, jsonl, txt) concatenated, each part ending
in a newline, declared headers kept once; the same formats gzip-compressed concatenated as gzip
members; anything else kept per shard, unchanged, under ``combined/<name>/`` with a
``manifest.json``. No byte of a part is changed but the newline after a line format's part and a
declared header that is the header. A name that is a file in some shards and a folder in others
(``report.txt`` and ``report.txt/part.txt``) is refused before anything is written:
``combined/report.txt`` cannot be both. A task whose ``task.py`` defines ``combine(paths, out)``
gets the committed output paths instead and writes into ``out`` itself
(:mod:`runner.results.custom`; ``runner combine RUN --task DIR`` takes a fixed one).

A local ``--out DIR`` holds one run's result: ``DIR/.cflow-result.json`` names the run and the
files it wrote there. Combining the same run again replaces those files (and only those); another
run's result there is refused unless ``--force``, which removes it first.

Where the parts are combined is the deployment's :class:`~runner.results.parts.Combiner`: on
Google Cloud in the bucket, and the runner downloads nothing unless ``--out DIR`` asks for a
local copy; without one, :class:`LocalCombiner` works here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from runner.results.custom import custom_combine, open_task
from runner.results.formats import (
    MANIFEST,
    Method,
    Plan,
    differing,
    file_sha256,
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
    shards_text,
)
from runner.results.parts import (
    Combined,
    Combiner,
    OnWorkers,
    OutTarget,
    Part,
    Say,
    Traffic,
    Warn,
    clear_result,
    committed_parts,
    local_parts,
    mark_result,
    result_owner,
)
from worker.errors import ConfigError
from worker.protocol import Layout, Manifest
from worker.store import Store


def _quiet(_message: str) -> None:
    """Says nothing."""


def combine_run(
    store: Store,
    manifest: Manifest,
    *,
    out: OutTarget | None = None,
    headers: bool | None = None,
    warn: Warn | None = None,
    say: Say | None = None,
    combiner: Combiner | None = None,
    workers: OnWorkers | None = None,
    task: Path | None = None,
) -> Combined:
    """Combine a run's committed outputs into ``runs/<run>/combined/`` (and ``out`` if given).

    The run's task folder says how (its ``[combine] headers``, its own ``combine(paths, out)``,
    which raises :class:`~runner.results.custom.CombineFailed` when it fails); ``task`` names
    another folder to take that from (a fixed ``combine()``), the outputs being the run's either
    way. ``headers`` overrides the folder's ``[combine] headers`` setting. ``combiner`` is where the
    parts are combined (the deployment's; None: here, :class:`LocalCombiner`), and ``workers``
    the means it may use to do heavy copying on the deployment's workers. What was done with
    each output name is in the result's ``how`` and said, one line a name, through ``say``
    (None: the ``workers``' narration).
    """
    warn = warn or _quiet
    tell = say or (workers.say if workers is not None else _quiet)
    if combiner is None:
        combiner = LocalCombiner()
    groups, shards, missing, late = committed_parts(store, manifest)
    with _Scratch() as work:
        folder = open_task(store, manifest, work, task)
        if headers is None:
            headers = folder.headers
        if folder.custom:
            combined = custom_combine(store, manifest, folder, groups, work(), tell)
        elif groups:
            _refuse_clash(manifest.run_id, groups)
            combined = combiner.concatenate(
                store, manifest, groups, headers=headers, warn=warn, work=work(), workers=workers
            )
        else:  # no shard wrote an output: nothing to join (no scratch folder is made)
            combined = Combined(files=[], shards=0, missing=0)
        combined.shards, combined.missing, combined.late = shards, missing, late
        if late:
            tell(
                f"{late} shards committed by attempts that ended after the run was cancelled"
                " are left out of its result"
            )
        combined.files.sort()
        combined.objects.sort()
        fresh = set(combined.objects)
        for key in list(store.list(Layout.combined(manifest.run_id))):
            if key not in fresh:  # left by an earlier combine: not part of this result
                store.delete(key)
        for rel in sorted(combined.how):
            tell(f"{rel}: {combined.how[rel]}")
        if out is not None:
            _copy_out(store, manifest.run_id, combined, out, combiner)
    return combined


def _refuse_clash(run_id: str, groups: dict[str, list[Part]]) -> None:
    """Refuse a name that is a file in some shards and a folder in others (``report.txt`` and
    ``report.txt/part.txt``), in one line naming the shards and what to change.

    A name's result is ``combined/<name>``, its joined file or its folder of per-shard copies,
    and it cannot be both: keeping one would drop the other's outputs or move them where no
    reader looks. Raised before anything is written, so the run's committed outputs and an
    earlier combine's result stay as they are (a task's own ``combine(paths, out)`` gets the
    paths and is not asked this).
    """
    nested: dict[str, list[str]] = {}  # a name that is a file -> the names under it
    for rel in sorted(groups):
        for parent in PurePosixPath(rel).parents:
            if str(parent) in groups:
                nested.setdefault(str(parent), []).append(rel)
    if not nested:
        return
    name = min(nested)
    under = nested[name]
    files = [p.shard for p in groups[name]]  # in shard order
    index = {p.shard: p.index for rel in under for p in groups[rel]}
    folders = sorted(index, key=index.__getitem__)
    more = f" and {len(under) - 1} more" if len(under) > 1 else ""
    others = f" (and {len(nested) - 1} more names like it)" if len(nested) > 1 else ""
    raise ConfigError(
        f"{name} is a file in {shards_text(files)} but a folder in {shards_text(folders)}"
        f" ({under[0]}{more}), and combined/{name} cannot be both{others}: have the task write"
        " one or the other under that name in every shard, or combine these outputs with a"
        f" combine(paths, out) in task.py (`runner combine {run_id} --task DIR`)"
    )


class _Scratch:
    """A scratch folder made on first use (``work()``), gone when the block ends."""

    def __init__(self) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Callable[[], Path]:
        return self.path

    def path(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cflow-combine-")
        return Path(self._tmp.name)

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()


def _copy_out(
    store: Store, run_id: str, combined: Combined, out: OutTarget, combiner: Combiner
) -> None:
    base = len(Layout.combined(run_id))
    if out.path is not None:
        owner = result_owner(out.path)
        if owner not in (None, run_id) and not out.force:  # there since --out was checked
            raise ConfigError(
                f"--out {out.path} now holds the result of run {owner}; give another folder, or"
                f" `runner combine {run_id} --out {out.path} --force` to replace it"
            )
        clear_result(out.path)  # the earlier result's files, and only those
        if combined.objects:
            mark_result(out.path, run_id, [key[base:] for key in combined.objects])
    for key in combined.objects:
        rel = key[base:]
        if out.path is not None:
            _copy_to_folder(store, key, out.path / rel, combined.traffic)
        else:
            assert out.bucket is not None
            combiner.copy_to_bucket(store, key, out.bucket, out.prefix + rel)
    combined.written.extend(out.where(key[base:]) for key in combined.files)


def _copy_to_folder(store: Store, key: str, dest: Path, traffic: Traffic) -> None:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        local = store.local_path(key)
        if local is not None and local.is_file():
            shutil.copyfile(local, dest)
        else:
            store.get_file(key, dest)
            traffic.downloaded_for_copy += dest.stat().st_size
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as exc:
        raise ConfigError(
            f"--out: cannot write {dest}: {exc.strerror} (an earlier result of another shape"
            " there?); give an empty folder"
        ) from None


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
            if plan.method is Method.GZIP:
                bad = [p.shard for p, path in zip(parts, paths, strict=True) if not _gzip(path)]
                plan = not_gzip(bad[0]) if bad else plan
            if plan.method is Method.PER_SHARD:
                _keep_per_shard(store, target + rel, list(zip(parts, paths, strict=True)), plan)
                combined.objects.extend(f"{target}{rel}/{kept_name(p.shard, rel)}" for p in parts)
                note = per_shard_note(rel, len(parts), plan.why)
                combined.add(rel, f"{target}{rel}/{MANIFEST}", note)
                continue
            staged = work / "combined" / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            if plan.method is Method.GZIP:
                note = gzip_note(join_bytes(paths, staged))
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


def _gzip(path: Path) -> bool:
    """Whether a part is gzip data (or empty, which adds no member)."""
    with path.open("rb") as fh:
        head = fh.read(2)
    return not head or is_gzip(head)


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


def join_bytes(paths: list[Path], dest: Path) -> int:
    """Concatenate files byte for byte (gzip members); returns how many were not empty."""
    joined = 0
    with dest.open("wb") as dst:
        for path in paths:
            if path.stat().st_size == 0:
                continue
            with path.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
            joined += 1
    return joined
