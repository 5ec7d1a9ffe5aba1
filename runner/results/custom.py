"""The task folder that decides how a run is combined, and the task's own ``combine(paths, out)``.

A run is combined as its task folder says: by default the bundle it was submitted with (its
``cflow.toml`` and, in ``task.py``, an optional ``combine(paths, out)``); ``runner combine RUN
--task DIR`` takes another folder's instead (a fixed ``combine()``), packed as ``submit`` packs
one. The shards' outputs stay what they are either way.

The task's ``combine()`` runs in a process of its own (``python -m worker.executors.zygote
--combine``) with the task's requirements installed. What it prints is kept in the store
(``runs/<run>/combine.log``); when it raises, :class:`CombineFailed` carries its traceback,
trimmed to the task's own frames and naming the task folder's files as the user knows them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.results.parts import Combined, Part, Say, local_parts
from worker.bundle import inspect_bundle, inspect_task, pack
from worker.errors import ConfigError, NotFound, TaskError
from worker.executors.base import WORKER_PATH
from worker.protocol import Entry, Layout, Manifest
from worker.store import Store
from worker.unpacked import install_requirements, unpack

BY_TASK = "written by the task's combine(paths, out)"
_FILE_LINE = re.compile(r'^(\s*File ")(?![/<])')  # a traceback's frame in a file of the task


class CombineFailed(TaskError):
    """The task's ``combine(paths, out)`` raised. ``str()`` is the one line; ``traceback`` the
    task's frames; ``task`` how the user names the folder whose combine() failed."""

    def __init__(self, message: str, *, traceback: str, task: str, run_id: str):
        super().__init__(message, run_id=run_id)
        self.traceback = traceback
        self.task = task

    def advice(self) -> str:
        """What to do about it, one line."""
        return (
            f"the shards' outputs are kept; fix combine() in {self.task}/, then `runner combine"
            f" {self.run_id} --task {self.task}/` combines them with the fixed one"
        )


@dataclass(frozen=True)
class TaskFolder:
    """The task folder a combine follows, unpacked in a scratch folder."""

    root: Path | None  # where it is unpacked: only where it is ``custom``
    shown: str  # how the user names it: the --task folder as given, or the submitted name
    headers: bool | None  # its ``[combine] headers`` setting
    custom: bool  # its task.py defines combine(paths, out)


_FACTS: dict[str, tuple[bool, bool | None]] = {}  # bundle sha -> (custom, headers) read from it
_FACTS_KEPT = 256  # bundles remembered so (a process's maps often share one)


def open_task(
    store: Store, manifest: Manifest, work: Callable[[], Path], task: Path | None
) -> TaskFolder:
    """The run's submitted task folder, or ``task`` when given; unpacked under ``work()`` only
    where it has a ``combine()`` to run (the settings are read from the bundle itself, once
    per bundle: it is named by its content)."""
    if task is None:
        known = _FACTS.get(manifest.bundle)
        if known is not None and not known[0]:  # no combine() of its own: nothing to unpack
            return TaskFolder(None, manifest.task_name, known[1], False)
        try:
            data = store.get(Layout.bundle(manifest.bundle))
        except NotFound:
            raise TaskError(
                f"task bundle {manifest.bundle[:12]} is missing", run_id=manifest.run_id
            ) from None
        sha, shown = manifest.bundle, manifest.task_name
    else:
        if not task.is_dir():
            raise ConfigError(f"--task {task} is not a folder")
        inspect_task(task)  # neither task.py nor task.sh: one line naming the folder
        data, sha = pack(task)
        shown = str(task).rstrip("/") or "/"
    info, settings = inspect_bundle(data, shown)
    custom = info.entry is Entry.PYTHON and info.has_combine
    if task is None:
        if len(_FACTS) >= _FACTS_KEPT:
            _FACTS.pop(next(iter(_FACTS)))
        _FACTS[sha] = (custom, settings.headers)
    root = unpack(data, sha, work() / "bundle", install=False).root if custom else None
    return TaskFolder(root, shown, settings.headers, custom)


def custom_combine(
    store: Store,
    manifest: Manifest,
    folder: TaskFolder,
    groups: dict[str, list[Part]],
    work: Path,
    say: Say,
) -> Combined:
    """Run the task's ``combine(paths, out)`` over every committed output, in shard order, and
    store what it wrote under ``runs/<run>/combined/``."""
    combined = Combined(files=[], shards=0, missing=0)
    inputs = [
        p
        for rel in sorted(groups)
        for p in local_parts(store, groups[rel], work / "in", combined.traffic)
    ]
    staged = work / "combined"
    staged.mkdir(exist_ok=True)
    _call_combine(store, manifest, folder, inputs, staged, say)
    target = Layout.combined(manifest.run_id)
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        rel = path.relative_to(staged).as_posix()
        store.put_file(target + rel, path)
        combined.add(rel, target + rel, BY_TASK)
    return combined


def _call_combine(
    store: Store, manifest: Manifest, folder: TaskFolder, inputs: list[Path], out: Path, say: Say
) -> None:
    assert folder.root is not None  # unpacked: it is custom
    work = out.parent
    listing, error, log = work / "combine-inputs.txt", work / "combine-error.txt", work / "log"
    listing.write_text("".join(f"{p}\n" for p in inputs))
    deps = install_requirements(folder.root, work / "bundle")
    path = [str(folder.root)] + ([str(deps)] if deps is not None else [])
    argv = [str(folder.root), str(out), str(listing), str(error)]
    with log.open("wb") as printed:
        code = subprocess.run(
            [sys.executable, "-m", "worker.executors.zygote", "--combine", *argv],
            cwd=folder.root,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([*path, WORKER_PATH])},
            stdin=subprocess.DEVNULL,
            stdout=printed,
            stderr=subprocess.STDOUT,
        ).returncode
    key = Layout.run_prefix(manifest.run_id) + "combine.log"
    lines = _count_lines(log)
    if lines:
        store.put_file(key, log)
        say(f"the task's combine() printed {lines} line{'s' * (lines != 1)}: {store.url(key)}")
    elif store.exists(key):
        store.delete(key)  # an earlier combine's
    if code == 0:
        return
    shown = _named(error.read_text(encoding="utf-8"), folder.shown) if error.is_file() else ""
    why = (shown.strip().splitlines() or [_ended(code)])[-1]
    raise CombineFailed(
        f"the task's combine(paths, out) failed: {why}",
        traceback=shown,
        task=folder.shown,
        run_id=manifest.run_id,
    )


def _named(traceback: str, folder: str) -> str:
    """A traceback whose task files are named relative to the task folder, named from it."""
    return "".join(
        _FILE_LINE.sub(lambda m: f"{m.group(1)}{folder}/", line)
        for line in traceback.splitlines(True)
    )


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            lines, last = lines + chunk.count(b"\n"), chunk[-1:]
    return lines + (last != b"\n")


def _ended(code: int) -> str:
    """How a combine that raised nothing ended: a signal (the OOM killer?), or sys.exit()."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with code {code}"
