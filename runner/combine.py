"""Combining a run's outputs into one result per output file name.

Only committed attempts are read, in shard order. By default files of the same name are
concatenated (CSV and TSV headers written once). A task whose ``task.py`` defines
``combine(paths, out)`` gets the committed output paths instead and writes into ``out`` itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from runner import runs
from worker.bundle import UnpackedBundle, inspect_task, install_requirements, unpack
from worker.errors import CFlowError, NotFound, TaskError
from worker.executor import _WORKER_PATH
from worker.protocol import Entry, Layout, Manifest, ShardResult
from worker.store import Store

HEADER_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class Combined:
    files: list[str]  # keys under runs/<run>/combined/
    shards: int  # committed shards combined
    missing: int  # shards with no committed result (failed or unfinished)


def combine_run(store: Store, manifest: Manifest, *, out: Path | None = None) -> Combined:
    """Combine a run's committed outputs into ``runs/<run>/combined/`` (and ``out`` if given)."""
    run_id = manifest.run_id
    committed = runs.committed(store, run_id)
    with tempfile.TemporaryDirectory(prefix="cflow-combine-") as tmp:
        work = Path(tmp)
        inputs: list[Path] = []
        missing = 0
        for shard in runs.iter_shards(store, run_id):
            if shard.id not in committed:
                missing += 1
                continue
            result = ShardResult.from_json(store.get(Layout.result(run_id, shard.id)))
            prefix = Layout.outputs(run_id, shard.id, result.attempt)
            for rel in result.outputs:
                inputs.append(_local_copy(store, prefix + rel, work / "in" / shard.id / rel))
        staged = work / "combined"
        staged.mkdir()
        bundle = _task_folder(store, manifest, work)
        if bundle is not None:
            _user_combine(bundle, inputs, staged)
        else:
            _concatenate(inputs, staged)
        keys = []
        target = Layout.combined(run_id)
        for path in sorted(p for p in staged.rglob("*") if p.is_file()):
            rel = path.relative_to(staged).as_posix()
            store.put_file(target + rel, path)
            keys.append(target + rel)
            if out is not None:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, out / rel)
    return Combined(files=keys, shards=len(committed), missing=missing)


def _local_copy(store: Store, key: str, dest: Path) -> Path:
    local = store.local_path(key)
    if local is not None and local.is_file():
        return local
    dest.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(key, dest)
    return dest


def _concatenate(inputs: list[Path], out: Path) -> None:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in inputs:
        groups[path.name].append(path)
    for name, paths in groups.items():
        with (out / name).open("wb") as dst:
            header: bytes | None = None
            for path in paths:
                with path.open("rb") as src:
                    if name.endswith(HEADER_SUFFIXES):
                        first = src.readline()
                        if header is None:
                            header = first
                            dst.write(first)
                        elif first != header:
                            dst.write(first)
                    last = b"\n"
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        last = chunk[-1:]
                    if last != b"\n":  # keep the next file's first record on its own line
                        dst.write(b"\n")


def _task_folder(store: Store, manifest: Manifest, work: Path) -> UnpackedBundle | None:
    """The unpacked task folder when its task.py defines combine(); else None."""
    if manifest.entry != Entry.PYTHON.value:
        return None
    try:
        data = store.get(Layout.bundle(manifest.bundle))
    except NotFound:
        raise TaskError(
            f"task bundle {manifest.bundle[:12]} is missing", run_id=manifest.run_id
        ) from None
    bundle = unpack(data, manifest.bundle, work / "bundle", install=False)
    if not inspect_task(bundle.root).has_combine:
        return None  # plain concatenation: the task's requirements are not needed here
    deps = install_requirements(bundle.root, work / "bundle")
    return UnpackedBundle(bundle.sha256, bundle.root, deps)


def _user_combine(bundle: UnpackedBundle, inputs: list[Path], out: Path) -> None:
    listing = out.parent / "combine-inputs.txt"
    listing.write_text("".join(f"{p}\n" for p in inputs))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.zygote",
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
