"""Combining a run's outputs into one result per output path.

Only committed attempts are read, in shard order. Files at the same path relative to their
attempt's ``out/`` (``sub/a.csv`` and ``a.csv`` are two paths) are concatenated, each part ending
in a newline. No line is ever dropped unless the task declares headers (``[combine] headers =
true`` in ``cflow.toml``, or ``runner combine --headers``): then the first line of each ``.csv`` or
``.tsv`` part after the first is dropped. A task whose ``task.py`` defines ``combine(paths, out)``
gets the committed output paths instead and writes into ``out`` itself.

On Cloud Storage the concatenation happens in the bucket (``compose``, see
:mod:`runner.backends.gcp.compose`): the runner downloads nothing unless ``--out DIR`` asks for a
local copy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from runner.backends.gcp.compose import StripRunner, Traffic
from runner.engine import runs
from worker.bundle import (
    UnpackedBundle,
    inspect_task,
    install_requirements,
    read_settings,
    unpack,
)
from worker.errors import CFlowError, ConfigError, NotFound, TaskError
from worker.executors.process import _WORKER_PATH
from worker.protocol import Entry, Layout, Manifest, ShardResult
from worker.store import Store

HEADER_SUFFIXES = (".csv", ".tsv")
Warn = Callable[[str], None]


@dataclass(frozen=True)
class OutTarget:
    """Where ``--out`` asks for a copy of the combined result: a local folder or a bucket path."""

    path: Path | None = None
    bucket: str | None = None
    prefix: str = ""  # object-name prefix in ``bucket``, ending in "/" unless empty

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"gs://{self.bucket}/{self.prefix}"

    def where(self, rel: str) -> str:
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
class Combined:
    files: list[str]  # keys under runs/<run>/combined/
    shards: int  # committed shards combined
    missing: int  # shards with no committed result (failed or unfinished)
    written: list[str] = field(default_factory=list)  # where --out copies went
    traffic: Traffic = field(default_factory=Traffic)


@dataclass(frozen=True)
class Part:
    rel: str  # path relative to the attempt's out/
    key: str  # the committed object


def committed_parts(store: Store, manifest: Manifest) -> tuple[dict[str, list[Part]], int, int]:
    """Committed outputs grouped by relative path, in shard order; plus (committed, missing)."""
    run_id = manifest.run_id
    done = runs.committed(store, run_id)
    groups: dict[str, list[Part]] = {}
    missing = 0
    batch: list[str] = []

    def read(keys: list[str]) -> None:  # one query (or a window of reads) per 1000 shards
        found = store.get_many(keys)
        for key in keys:
            if key not in found:  # removed since it was listed (a concurrent `runner rm`)
                raise NotFound(f"no object {key}")
            result = ShardResult.from_json(found[key])
            prefix = Layout.outputs(run_id, result.shard_id, result.attempt)
            for rel in result.outputs:
                groups.setdefault(rel, []).append(Part(rel, prefix + rel))

    for shard in runs.iter_shards(store, run_id):
        if shard.id not in done:
            missing += 1
            continue
        batch.append(Layout.result(run_id, shard.id))
        if len(batch) == 1000:
            read(batch)
            batch = []
    read(batch)
    return groups, len(done), missing


def combine_run(
    store: Store,
    manifest: Manifest,
    *,
    out: OutTarget | None = None,
    headers: bool | None = None,
    warn: Warn | None = None,
    strip: StripRunner | None = None,
    strip_threshold: int = 0,
) -> Combined:
    """Combine a run's committed outputs into ``runs/<run>/combined/`` (and ``out`` if given).

    ``headers`` overrides the task's ``[combine] headers`` setting. On Cloud Storage, ``strip``
    makes header-less copies of parts elsewhere (on the workers) when they add up to more than
    ``strip_threshold`` bytes.
    """
    warn = warn or (lambda _msg: None)
    groups, shards, missing = committed_parts(store, manifest)
    with tempfile.TemporaryDirectory(prefix="cflow-combine-") as tmp:
        work = Path(tmp)
        bundle, settings_headers = _task_folder(store, manifest, work)
        if headers is None:
            headers = settings_headers
        if bundle is not None:
            combined = _user_combine_run(store, manifest, bundle, groups, work)
        elif _is_gcs(store):
            from runner.backends.gcp.combine import combine_in_bucket

            combined = combine_in_bucket(
                store,  # type: ignore[arg-type]
                manifest,
                groups,
                headers=headers,
                warn=warn,
                strip=strip,
                strip_threshold=strip_threshold,
            )
        else:
            combined = _concatenate_run(store, manifest, groups, work, headers=headers, warn=warn)
        combined.shards, combined.missing = shards, missing
        fresh = set(combined.files)
        for key in list(store.list(Layout.combined(manifest.run_id))):
            if key not in fresh:  # left by an earlier combine: not part of this result
                store.delete(key)
        if out is not None:
            _copy_out(store, manifest.run_id, combined, out)
    return combined


def _is_gcs(store: Store) -> bool:
    return type(store).__name__ == "GcsStore"  # without importing the cloud client for local runs


def _copy_out(store: Store, run_id: str, combined: Combined, out: OutTarget) -> None:
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
            from runner.backends.gcp.compose import copy_to

            assert out.bucket is not None
            copy_to(store, key, out.bucket, out.prefix + rel)  # type: ignore[arg-type]
        combined.written.append(out.where(rel))


def header_warning(first_lines: list[bytes], rel: str) -> str | None:
    """A hint when every part of a CSV/TSV starts with the same line and no one said why."""
    if len(first_lines) > 1 and first_lines[0].strip() and len(set(first_lines)) == 1:
        line = first_lines[0].decode(errors="replace").strip()
        return (
            f"every part of {rel} starts with {line!r}; kept in each part. If it is a header,"
            " set `[combine] headers = true` in the task's cflow.toml (or `runner combine"
            " --headers`)"
        )
    return None


def _concatenate_run(
    store: Store,
    manifest: Manifest,
    groups: dict[str, list[Part]],
    work: Path,
    *,
    headers: bool | None,
    warn: Warn,
) -> Combined:
    target = Layout.combined(manifest.run_id)
    combined = Combined(files=[], shards=0, missing=0)
    for rel in sorted(groups):
        staged = work / "combined" / rel
        staged.parent.mkdir(parents=True, exist_ok=True)
        paths = list(_local_parts(store, groups[rel], work / "in", combined.traffic))
        firsts = concatenate(paths, staged, strip_headers=bool(headers) and _headed(rel))
        if headers is None and _headed(rel) and (hint := header_warning(firsts, rel)):
            warn(hint)
        store.put_file(target + rel, staged)
        combined.files.append(target + rel)
    return combined


def _headed(rel: str) -> bool:
    return rel.lower().endswith(HEADER_SUFFIXES)


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
        env={**os.environ, "PYTHONPATH": os.pathsep.join([bundle.python_path(), _WORKER_PATH])},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CFlowError(f"the task's combine(paths, out) failed: {last}")
