"""Combining a run's outputs into one result per output name.

Only committed attempts are read, in shard order. Outputs at the same path relative to their
attempt's ``out/`` (``sub/a.csv`` and ``a.csv`` are two names) are combined by the rule of
:mod:`runner.results.formats`: line formats (csv, tsv, jsonl, txt) concatenated, each part ending
in a newline, declared headers kept once; the same formats gzip-compressed concatenated as gzip
members, each part's content ending in a newline; anything else, and a line format one of whose
parts is not text, kept per shard, unchanged, under ``combined/<name>/`` with a
``manifest.json``. No byte of a part is changed: a newline (a gzip member holding one) is added
after a part that does not end in one, and a declared header that is the header is left out. A
name that is a file in some shards and a folder in others (``report.txt`` and
``report.txt/part.txt``) is refused before anything is written: ``combined/report.txt`` cannot be
both. A task whose ``task.py`` defines ``combine(paths, out)`` gets the committed output paths
instead and writes into ``out`` itself (:mod:`runner.results.custom`; ``runner combine RUN --task
DIR`` takes a fixed one).

A local ``--out DIR`` holds one run's result: ``DIR/.cflow-result.json`` names the run and the
files it wrote there. Combining the same run again replaces those files (and only those); another
run's result there is refused unless ``--force``, which removes it first; a file of the user's
where the result writes one is refused, ``--force`` or not
(:func:`~runner.results.parts.refuse_others`).

Where the parts are combined is the deployment's :class:`~runner.results.parts.Combiner`: on
Google Cloud in the bucket, and the runner downloads nothing unless ``--out DIR`` asks for a
local copy; without one, :class:`~runner.results.local.LocalCombiner` works here.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from runner.results.custom import custom_combine, open_task
from runner.results.formats import (
    shards_text,
)
from runner.results.local import LocalCombiner
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
    mark_result,
    refuse_others,
    result_owner,
)
from worker.errors import ConfigError
from worker.protocol import Layout, Manifest
from worker.store import Store
from worker.tempdirs import temp_folder


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
            self._tmp = temp_folder("combine")
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
        refuse_others(out.path, run_id, [key[base:] for key in combined.objects])
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
