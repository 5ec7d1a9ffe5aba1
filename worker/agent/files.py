"""An attempt's files: its log, its staged input and its sealed outputs."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from worker.errors import TaskError
from worker.executors.base import remove_tree
from worker.executors.tracebacks import printable, traceback_line
from worker.protocol import Layout, Shard
from worker.pyfunc.shared import FILES_PARAM
from worker.store import Store
from worker.taskapi import RETURN_FILE


class AttemptLog:
    """An attempt's log: written in the slot's scratch folder, stored only when it has text.

    Locally the file is moved into the store (a rename, on the same disk) once the attempt has
    run for a moment, so ``runner logs --follow`` reads it while it grows: the task keeps
    writing to the same file. A short shard that prints nothing touches no store folder.
    """

    def __init__(self, path: Path, store: Store, key: str):
        self.path = path
        self._store = store
        self.key = key
        self.target = store.local_path(key)

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def show(self) -> None:
        """While it runs: make the log readable where the store keeps it."""
        if self.target is None:
            if self._size():
                self._store.put_file(self.key, self.path)
        elif self.path != self.target:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path, self.target)
            self.path = self.target

    def store(self) -> None:
        """When it ended: store a log with text; leave an empty one for the next attempt."""
        if self.path == self.target:
            return
        if not self._size():
            return
        if self.target is None:
            self._store.put_file(self.key, self.path)
            self.path.unlink(missing_ok=True)
        else:
            self.show()

    def note(self, text: str) -> None:
        """Add the worker's own line (``cflow: ...``) for the user to read."""
        with self.path.open("a") as fh:
            fh.write(f"cflow: {text}\n")

    def last_line(self, limit: int = 16384) -> str | None:
        """The error of the Python traceback that ends the log, else the log's last non-empty
        line that is not the worker's own note: the error a user sees. Only a newline ends a
        line: a carriage return inside one (a script with Windows line endings) is shown as a
        backslash and ``r``, not taken as a line break that hides what came before it."""
        try:
            with self.path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(size - limit, 0))
                tail = fh.read().decode("utf-8", "replace")
        except OSError:
            return None
        lines = tail.split("\n")
        said = traceback_line(lines)  # a Python traceback's error, not its message's last line
        if said is not None:
            return said[:500]
        for line in reversed(lines):
            line = printable(line.strip())
            if line and not line.startswith("cflow: the task's process"):
                return line[:500]
        return None


def stage_input(store: Store, shard: Shard, stage: bool, work: Path, worker: str) -> str | None:
    """The input path the task reads: a local path as given, a remote one as given or (``stage``)
    fetched into ``work`` first.

    Raises:
        TaskError: a local input does not exist on this worker.
    """
    if not shard.input:
        return None
    if "://" not in shard.input:
        if not Path(shard.input).exists():
            raise TaskError(f"input {shard.input} does not exist on worker {worker}")
        return shard.input
    if not stage:
        return shard.input
    name = shard.input.rstrip("/").rsplit("/", 1)[-1] or "input"
    target = work / name
    shutil.rmtree(target.parent, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    store.fetch(shard.input, target)
    return str(target)


GONE = "-"  # the print of a file that is not there


def stat_print(st: os.stat_result) -> str:
    """A local file as the cross-run cache compares it, with no byte read: its size, its
    modification time and its inode (which tells a file renamed into place from the one it
    replaced, even with the same time). Not the change time: a task that hard-links its input
    into its outputs changes it, and would never be reused."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def path_print(path: str) -> str:
    """:func:`stat_print` of the file at ``path`` as it is now (:data:`GONE`: none)."""
    try:
        return stat_print(os.stat(path))
    except OSError:
        return GONE


def named_files(shard: Shard) -> list[str]:
    """The files a shard's ``cflow`` items name (``cflow.inputs``; with the cache only)."""
    names = (shard.params or {}).get(FILES_PARAM)
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def seen_print(input_print: str | None, files: Mapping[str, str]) -> str | None:
    """One print of the local files a shard reads: its input's (None: no local input), or, with
    files its items name, a digest of them all; None when it reads none."""
    if not files:
        return input_print
    blob = json.dumps([input_print, sorted(files.items())]).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def local_seen(shard: Shard) -> str | None:
    """:func:`seen_print` of the shard's local input and named local files as they are now.
    Taken at an attempt's start and end and kept in its commit, so the cache reuses the commit
    only where what the attempt read is what the shard's key covers (``runner.engine.cache``):
    a stat per file each time."""
    local = shard.input if shard.input and "://" not in shard.input else None
    files = {n: path_print(n) for n in named_files(shard) if "://" not in n}
    return seen_print(path_print(local) if local else None, files)


def seal_outputs(
    store: Store, run_id: str, shard_id: str, attempt: int, out_dir: Path, *, contained: bool
) -> list[str]:
    """Move the attempt's outputs out of the task's reach, into its prefix, read-only; their
    paths relative to ``out_dir``. ``contained``: the attempt ran in a container, whose links
    mean its paths, not this machine's (:func:`_ready_to_commit`).

    Every process of the attempt is gone by now (the executor saw to it); what a process
    we could not see might still hold open is the scratch copy, never the stored one. An
    output folder left empty is kept for the next attempt (no folder churn per shard).
    Its caller seals before it removes the attempt's working folder, so an output linked to a
    file in there is still whole to copy (:func:`_ready_to_commit`).

    Raises:
        TaskError: an output cannot be committed as it is (see :func:`_ready_to_commit`); the
            outputs are dropped, so nothing of the attempt reaches a commit or the next one.
    """
    try:
        with os.scandir(out_dir) as entries:
            if next(entries, None) is None:
                return []
    except FileNotFoundError:
        return []
    try:
        _ready_to_commit(out_dir, contained)
    except TaskError:
        remove_tree(out_dir)
        raise
    outputs = list_files(out_dir)
    if not outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
        return []
    prefix = Layout.outputs(run_id, shard_id, attempt)
    target = store.local_path(prefix)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(out_dir, target)
        except OSError:  # another disk, or a leftover target: copy instead
            shutil.copytree(out_dir, target, dirs_exist_ok=True)
            shutil.rmtree(out_dir, ignore_errors=True)
        _read_only(target)
        return outputs
    for rel in outputs:
        store.put_file(prefix + rel, out_dir / rel)
    shutil.rmtree(out_dir, ignore_errors=True)
    return outputs


def take_return(out_dir: Path, returned: str | None = None) -> Any:
    """What ``run(shard)`` returned (None when nothing): ``returned`` where the attempt's end
    brought it (a warm host's reply), else read from the output folder, where the task's
    process left it as JSON; a file of that name is taken out of the folder either way, so it
    is never sealed as an output.

    Raises:
        TaskError: the file there is not JSON (the task wrote it itself).
    """
    path = out_dir / RETURN_FILE
    if returned is not None:
        path.unlink(missing_ok=True)
        try:
            return json.loads(returned)
        except ValueError as exc:  # the host made it with json.dumps: not seen
            raise TaskError(f"run()'s return value is not JSON: {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        path.unlink(missing_ok=True)
        raise TaskError(f"run()'s return value in {RETURN_FILE} cannot be read: {exc}") from None
    path.unlink()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise TaskError(f"{RETURN_FILE} in the output folder is not JSON: {exc}") from None


def list_files(folder: Path) -> list[str]:
    """Every file under ``folder``, as sorted POSIX paths relative to it."""
    if not folder.is_dir():
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


_LINK_FIX = "write the file itself into the output folder, not a link to it"


def _ready_to_commit(out_dir: Path, contained: bool) -> None:
    """Make the outputs fit to commit, before any is moved: every name UTF-8, no symbolic
    link left, every file a regular file of their own (none hard-linked from elsewhere).

    The store's keys, its records and ``runner combine`` hold names as text: a name that is not
    UTF-8 would be committed and then break every combine of the run. A link would be committed
    as a link, so what it points at (outside the store, or in the attempt's working folder,
    removed next) could change or vanish after the commit. A link to a regular file becomes a
    copy of that file as the attempt left it, as ``cp -L`` would: the task made it to be read.
    A link made in a container (``contained``) named a path there: followed here it would copy
    this machine's file of that name (``/etc/hostname``, a secret) into the outputs. Only one
    that leads to a file of the outputs themselves is copied; any other is refused.

    Raises:
        TaskError: a file or folder name is not UTF-8, a link leads to no regular file (or,
            ``contained``, out of the outputs), or an output is a fifo, a socket or a device.
    """
    inside = os.path.realpath(out_dir) if contained else None
    folders = [out_dir]
    while folders:
        with os.scandir(folders.pop()) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            rel = os.path.relpath(entry.path, out_dir)
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise TaskError(
                    f"output {os.fsencode(rel)!r} has a name that is not UTF-8:"
                    " output names must be UTF-8"
                ) from None
            if entry.is_symlink():
                _copy_link(Path(entry.path), rel, inside)
            elif entry.is_dir(follow_symlinks=False):
                folders.append(Path(entry.path))
            else:
                _own_file(Path(entry.path), rel, entry.stat(follow_symlinks=False))


def _copy_link(link: Path, rel: str, inside: str | None) -> None:
    """Replace the output ``link`` (``rel`` in the output folder) by a copy of the regular file
    it leads to (``inside``: only one in that folder). What is copied is the file that was
    checked, opened before the link goes; a fifo or a device is never opened, so it cannot
    block the worker or act on a read.

    Raises:
        TaskError: the link leads nowhere, or out of ``inside``, or to a folder, fifo, device
            or socket.
    """
    said = f"output {rel!r} is a link to {os.readlink(link)!r}"
    if inside is not None and not os.path.realpath(link).startswith(inside + os.sep):
        raise TaskError(
            f"{said}, made in the container: what it names there is not the file of that"
            f" name here; {_LINK_FIX} (a link within the output folder is kept as a copy)"
        )
    try:
        kind = _kind(os.stat(link).st_mode)
        fd = None if kind else os.open(link, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise TaskError(f"{said}, which does not exist: {_LINK_FIX}") from None
    except OSError as exc:
        raise TaskError(f"{said}, which cannot be read ({exc.strerror}): {_LINK_FIX}") from None
    if fd is not None:
        with os.fdopen(fd, "rb") as src:
            kind = _kind(os.fstat(fd).st_mode)
            if kind is None:
                link.unlink()
                with link.open("xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                return
    raise TaskError(f"{said}, which is {kind}, not a regular file: {_LINK_FIX}")


def _own_file(path: Path, rel: str, st: os.stat_result) -> None:
    """Make the output ``path`` a regular file of the outputs' own: one hard-linked from
    elsewhere (``os.link``) becomes a copy, as sealing it 0444 would change the file the task
    linked, and whoever holds its other name could still rewrite what was committed.

    Raises:
        TaskError: it is a fifo, a socket or a device, not a regular file.
    """
    kind = _kind(st.st_mode)
    if kind is not None:
        raise TaskError(f"output {rel!r} is {kind}, not a regular file: write a regular file")
    if st.st_nlink > 1:
        copy = path.with_name(f".{path.name}.cflow-copy")
        shutil.copy2(path, copy)
        os.replace(copy, path)


def _kind(mode: int) -> str | None:
    """None for a regular file; else what it is, as a user would name it."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _read_only(folder: Path) -> None:
    """Sealed files are 0444. Folders stay writable, so a user can still delete a run with
    ``rm -r``; what could have rewritten them (the attempt's processes) is gone."""
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(path.lstat().st_mode):
                path.chmod(0o444)
