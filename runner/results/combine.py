"""Combining a run's outputs into one result per output path.

Only committed attempts are read, in shard order. Files at the same path relative to their
attempt's ``out/`` (``sub/a.csv`` and ``a.csv`` are two paths) are concatenated, each part ending
in a newline. No line is ever dropped unless the task declares headers (``[combine] headers =
true`` in ``cflow.toml``, or ``runner combine --headers``): then the first line of each ``.csv`` or
``.tsv`` part after the first is dropped. A task whose ``task.py`` defines ``combine(paths, out)``
gets the committed output paths instead and writes into ``out`` itself.

Where the parts are concatenated is the deployment's :class:`~runner.results.parts.Combiner`:
on Google Cloud they are composed in the bucket, and the runner downloads nothing unless
``--out DIR`` asks for a local copy; without one, :class:`LocalCombiner` concatenates them here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from runner.results.parts import (
    Combined,
    Combiner,
    OnWorkers,
    OutTarget,
    Part,
    Traffic,
    Warn,
    committed_parts,
    headed,
    header_warning,
)
from worker.bundle import (
    UnpackedBundle,
    inspect_task,
    install_requirements,
    read_settings,
    unpack,
)
from worker.errors import CFlowError, ConfigError, NotFound, TaskError
from worker.executors.base import WORKER_PATH
from worker.protocol import Entry, Layout, Manifest
from worker.store import Store


def combine_run(
    store: Store,
    manifest: Manifest,
    *,
    out: OutTarget | None = None,
    headers: bool | None = None,
    warn: Warn | None = None,
    combiner: Combiner | None = None,
    workers: OnWorkers | None = None,
) -> Combined:
    """Combine a run's committed outputs into ``runs/<run>/combined/`` (and ``out`` if given).

    ``headers`` overrides the task's ``[combine] headers`` setting. ``combiner`` is where the
    parts are concatenated (the deployment's; None: here, :class:`LocalCombiner`), and
    ``workers`` the means it may use to do heavy copying on the deployment's workers.
    """
    warn = warn or (lambda _msg: None)
    if combiner is None:
        combiner = LocalCombiner()
    groups, shards, missing = committed_parts(store, manifest)
    with tempfile.TemporaryDirectory(prefix="cflow-combine-") as tmp:
        work = Path(tmp)
        bundle, settings_headers = _task_folder(store, manifest, work)
        if headers is None:
            headers = settings_headers
        if bundle is not None:
            combined = _user_combine_run(store, manifest, bundle, groups, work)
        else:
            combined = combiner.concatenate(
                store, manifest, groups, headers=headers, warn=warn, work=work, workers=workers
            )
        combined.shards, combined.missing = shards, missing
        fresh = set(combined.files)
        for key in list(store.list(Layout.combined(manifest.run_id))):
            if key not in fresh:  # left by an earlier combine: not part of this result
                store.delete(key)
        if out is not None:
            _copy_out(store, manifest.run_id, combined, out, combiner)
    return combined


def _copy_out(
    store: Store, run_id: str, combined: Combined, out: OutTarget, combiner: Combiner
) -> None:
    base = len(Layout.combined(run_id))
    for key in combined.files:
        rel = key[base:]
        if out.path is not None:
            dest = out.path / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            local = store.local_path(key)
            if local is not None and local.is_file():
                shutil.copyfile(local, dest)
            else:
                store.get_file(key, dest)
                combined.traffic.downloaded_for_copy += dest.stat().st_size
        else:
            assert out.bucket is not None
            combiner.copy_to_bucket(store, key, out.bucket, out.prefix + rel)
        combined.written.append(out.where(rel))


class LocalCombiner:
    """Concatenates on this machine: parts the store keeps as local files are read in place,
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
        """Concatenate each path's parts into ``runs/<run>/combined/<path>`` (``workers``: not
        needed here)."""
        target = Layout.combined(manifest.run_id)
        combined = Combined(files=[], shards=0, missing=0)
        for rel in sorted(groups):
            staged = work / "combined" / rel
            staged.parent.mkdir(parents=True, exist_ok=True)
            paths = list(_local_parts(store, groups[rel], work / "in", combined.traffic))
            firsts = concatenate(paths, staged, strip_headers=bool(headers) and headed(rel))
            if headers is None and headed(rel) and (hint := header_warning(firsts, rel)):
                warn(hint)
            store.put_file(target + rel, staged)
            combined.files.append(target + rel)
        return combined

    def copy_to_bucket(self, store: Store, key: str, bucket: str, name: str) -> None:
        """Refused: a Cloud Storage path needs the Google Cloud backend."""
        raise ConfigError(
            f"--out gs://{bucket}/{name} is a Cloud Storage path; it needs the Google Cloud backend"
        )


def _local_parts(store: Store, parts: list[Part], work: Path, traffic: Traffic) -> Iterator[Path]:
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


def concatenate(
    paths: Iterator[Path] | list[Path], dest: Path, *, strip_headers: bool
) -> list[bytes]:
    """Concatenate files into ``dest``, each part ending in a newline; returns each first line.

    With ``strip_headers`` the first line of every part but the first is left out.
    """
    firsts: list[bytes] = []
    with dest.open("wb") as dst:
        for n, path in enumerate(paths):
            with path.open("rb") as src:
                first = src.readline()
                firsts.append(first)
                if not (strip_headers and n > 0):
                    dst.write(first)
                last = first[-1:] or b"\n"
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    last = chunk[-1:]
                if last != b"\n":  # keep the next part's first line on a line of its own
                    dst.write(b"\n")
    return firsts


def _task_folder(
    store: Store, manifest: Manifest, work: Path
) -> tuple[UnpackedBundle | None, bool | None]:
    """(the unpacked task when its task.py defines combine(), the task's headers setting)."""
    try:
        data = store.get(Layout.bundle(manifest.bundle))
    except NotFound:
        raise TaskError(
            f"task bundle {manifest.bundle[:12]} is missing", run_id=manifest.run_id
        ) from None
    bundle = unpack(data, manifest.bundle, work / "bundle", install=False)
    headers = read_settings(bundle.root).headers
    if manifest.entry != Entry.PYTHON.value or not inspect_task(bundle.root).has_combine:
        return None, headers  # plain concatenation: the task's requirements are not needed here
    deps = install_requirements(bundle.root, work / "bundle")
    return UnpackedBundle(bundle.sha256, bundle.root, deps), headers


def _user_combine_run(
    store: Store,
    manifest: Manifest,
    bundle: UnpackedBundle,
    groups: dict[str, list[Part]],
    work: Path,
) -> Combined:
    combined = Combined(files=[], shards=0, missing=0)
    inputs = [
        p
        for rel in sorted(groups)
        for p in _local_parts(store, groups[rel], work / "in", combined.traffic)
    ]
    staged = work / "combined"
    staged.mkdir(exist_ok=True)
    _user_combine(bundle, inputs, staged)
    target = Layout.combined(manifest.run_id)
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = path.relative_to(staged).as_posix()
        store.put_file(target + rel, path)
        combined.files.append(target + rel)
    return combined


def _user_combine(bundle: UnpackedBundle, inputs: list[Path], out: Path) -> None:
    listing = out.parent / "combine-inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in inputs))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.executors.zygote",
            "--combine",
            str(bundle.root),
            str(out),
            str(listing),
        ],
        cwd=bundle.root,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([bundle.python_path(), WORKER_PATH])},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CFlowError(f"the task's combine(paths, out) failed: {last}")
