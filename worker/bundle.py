"""Task bundles: the user's task folder as a content-addressed tarball.

The runner packs ``task/`` reproducibly (sorted entries, zeroed times and owners) so the same code
always has the same sha256 and is uploaded once. Workers verify the hash before unpacking and keep
one unpacked copy per hash, with the task's ``requirements.txt`` installed beside it, for as long
as it is used (:mod:`worker.unpacked`).
"""

from __future__ import annotations

import ast
import errno
import gzip
import hashlib
import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from worker import defaults
from worker.errors import TaskError
from worker.protocol import Entry

PYTHON_ENTRY = "task.py"
SHELL_ENTRY = "task.sh"
REQUIREMENTS = "requirements.txt"
SETTINGS = "cflow.toml"  # optional task settings (see TaskSettings)
IGNORE = ".cflowignore"  # gitignore-syntax patterns of files kept out of the bundle
_SKIP_DIRS = {"__pycache__", ".git", ".venv", "venv", ".mypy_cache", ".pytest_cache", ".cflow"}
_SKIP_SUFFIXES = (".pyc", ".pyo")
SAMPLED = 256 * 1024  # bytes of a bundle's largest file tried with deflate (pack)
STORED_RATIO = 0.9  # deflated to more than this of its size: the bundle is stored, not deflated


@dataclass(frozen=True)
class TaskInfo:
    entry: Entry
    has_combine: bool


@dataclass(frozen=True)
class TaskSettings:
    """``cflow.toml`` in the task folder. Every setting is optional::

        [combine]
        headers = true   # each .csv/.tsv output starts with a header line: keep it once

    ``headers`` is None when the task does not say: combine then keeps every line.
    """

    headers: bool | None = None


def read_settings(folder: Path) -> TaskSettings:
    """The task's ``cflow.toml`` (defaults when absent); raises TaskError on a bad file."""
    path = folder / SETTINGS
    if not path.is_file():
        return TaskSettings()
    return _settings(path.read_bytes(), path)


def _settings(raw: bytes, path: Path) -> TaskSettings:
    """The settings in a ``cflow.toml``'s bytes (``path``: how errors name it)."""
    import tomllib

    try:
        data = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise TaskError(f"{path} is not valid TOML: {err}") from None
    unknown = set(data) - {"combine"}
    combine = data.get("combine", {})
    if unknown or not isinstance(combine, dict) or set(combine) - {"headers"}:
        extra = sorted(
            unknown | (set(combine) - {"headers"} if isinstance(combine, dict) else set())
        )
        raise TaskError(f"{path}: unknown setting {', '.join(extra) or 'combine'}; see the README")
    headers = combine.get("headers")
    if headers is not None and not isinstance(headers, bool):
        raise TaskError(f"{path}: [combine] headers must be true or false, not {headers!r}")
    return TaskSettings(headers=headers)


def inspect_task(folder: Path) -> TaskInfo:
    """Decide how a task folder runs, without importing it; raises TaskError with the fix."""
    if not folder.is_dir():
        if not folder.exists():
            said = f"task folder {folder} does not exist"
        else:  # a path that exists (task.py itself, say) but is no folder
            said = f"{folder} is a {'file' if folder.is_file() else 'special file'}, not a folder"
        raise TaskError(f"{said}; pass the folder holding task.py or task.sh")
    py, sh = folder / PYTHON_ENTRY, folder / SHELL_ENTRY
    if py.is_file():
        return _python_task(py.read_text(), py)
    if sh.is_file():
        return TaskInfo(Entry.SHELL, has_combine=False)
    raise TaskError(f"task folder {folder} has neither task.py with run(shard) nor task.sh")


def _python_task(source: str, path: Path) -> TaskInfo:
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as err:
        raise TaskError(f"{path} has a syntax error at line {err.lineno}: {err.msg}") from None
    names = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    # Whether run is bound, and how, is for the runner's checks to say (--no-check skips them).
    return TaskInfo(Entry.PYTHON, has_combine="combine" in names)


def inspect_bundle(data: bytes, name: str) -> tuple[TaskInfo, TaskSettings]:
    """:func:`inspect_task` and :func:`read_settings` of a packed bundle, read in memory
    without unpacking it (``name``: how errors name the folder)."""
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name in (PYTHON_ENTRY, SHELL_ENTRY, SETTINGS):
                fh = tar.extractfile(member)
                members[member.name] = fh.read() if fh is not None else b""
    folder = Path(name)
    if PYTHON_ENTRY in members:
        info = _python_task(members[PYTHON_ENTRY].decode(errors="replace"), folder / PYTHON_ENTRY)
    elif SHELL_ENTRY in members:
        info = TaskInfo(Entry.SHELL, has_combine=False)
    else:
        raise TaskError(f"task folder {name} has neither task.py with run(shard) nor task.sh")
    raw = members.get(SETTINGS)
    settings = _settings(raw, folder / SETTINGS) if raw is not None else TaskSettings()
    return info, settings


def _ignore_spec(folder: Path) -> Callable[[str], bool]:
    """A matcher of the ``.cflowignore`` patterns (gitignore syntax); matches nothing if absent."""
    path = folder / IGNORE
    if not path.is_file():
        return lambda _rel: False
    import pathspec  # the runner's dependency: workers only unpack

    spec = pathspec.GitIgnoreSpec.from_lines(path.read_text().splitlines())
    return spec.match_file


def is_ignored(folder: Path, rel: str) -> bool:
    """Whether ``.cflowignore`` keeps the file ``rel`` (a POSIX path under ``folder``) out of
    the bundle."""
    return _ignore_spec(folder)(rel)


def bundle_files(folder: Path) -> list[Path]:
    """The files that go into the bundle, in a stable order.

    Caches, virtual environments and CFlow's own folders (a store, a combined result) are
    always left out, and so is whatever ``.cflowignore`` matches (a directory pattern such as
    ``data/`` leaves out everything below it).

    Raises:
        TaskError: an entry left in is not a readable file (a broken or looping link, a fifo,
            a socket, a device), named with the fix.
    """
    ignored = _ignore_spec(folder)
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        dirs[:] = sorted(
            d
            for d in dirs
            if d not in _SKIP_DIRS
            and not ignored((base / d).as_posix() + "/")
            and not _ours(Path(root, d))
        )
        for name in sorted(files):
            if not name.endswith(_SKIP_SUFFIXES) and not ignored((base / name).as_posix()):
                path = Path(root, name)
                _refuse_odd(folder, path)
                out.append(path)
    return out


def _ours(path: Path) -> bool:
    """Whether the folder ``path`` is a CFlow store or a combined result folder (``--store``
    or ``--out`` inside the task folder). Bundled, each run's bundle held the last run's store
    or result: it grew with every run, and the cache never found the same task twice. A store
    made before it was marked is known by its queue and runs."""
    if (path / defaults.STORE_MARK).is_file() or (path / defaults.RESULT_MARK).is_file():
        return True
    return (path / "queue.db").is_file() and (path / "runs").is_dir()


def _refuse_odd(folder: Path, path: Path) -> None:
    """Raise TaskError unless ``path`` is (or links to) a readable regular file: a dangling or
    looping link, a fifo (opening one would wait forever), a socket or a device cannot go into
    a bundle of plain files, and leaving it out unasked would make the bundle other than the
    folder."""
    fix = f"remove it or list it in {folder / IGNORE}"
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if not path.is_symlink():  # removed since the folder was listed
            raise TaskError(f"{path} went away while the task was packed; submit again") from None
        raise TaskError(
            f"{path} is a link to {os.readlink(path)}, which does not exist: {fix}"
        ) from None
    except OSError as exc:
        what = "a link that loops" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
        raise TaskError(f"{path} is {what}, not a file for the task bundle: {fix}") from None
    if stat.S_ISREG(mode):
        if not os.access(path, os.R_OK):
            raise TaskError(
                f"{path} cannot be read (permission denied): {fix}, or make it readable"
            )
        return
    kinds = {
        stat.S_ISFIFO: "fifo",
        stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "special file")
    link = "a link to " if path.is_symlink() else ""
    raise TaskError(f"{path} is {link}a {kind}, not a file for the task bundle: {fix}")


def pack(folder: Path) -> tuple[bytes, str]:
    """The bundle's bytes and their sha256; identical folders give identical bytes."""
    raw = io.BytesIO()
    files = bundle_files(folder)
    with (
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=_level(files)) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in files:
            rel = path.relative_to(folder).as_posix()
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
            info.mtime = 0
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    data = raw.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _level(files: list[Path]) -> int:
    """The bundle's gzip level: 9, or 0 (stored, not deflated) where its largest file is over
    :data:`SAMPLED` bytes and a sample from its middle does not deflate to less than
    :data:`STORED_RATIO` of itself. Such bytes (a model's weights pickled with a function, say)
    gain nothing from deflate, which takes about 20 ms a MB of them here; stored, 2 ms."""
    sizes = [(path.stat().st_size, path) for path in files]
    size, largest = max(sizes, default=(0, None))
    if largest is None or size <= SAMPLED:
        return 9
    with largest.open("rb") as fh:
        fh.seek((size - SAMPLED) // 2)
        sample = fh.read(SAMPLED)
    return 0 if len(zlib.compress(sample, 1)) > STORED_RATIO * len(sample) else 9


@dataclass(frozen=True)
class UnpackedBundle:
    sha256: str
    root: Path  # the task folder, unpacked
    deps: Path | None  # where requirements.txt was installed (on PYTHONPATH)

    def python_path(self) -> str:
        parts = [str(self.root)] + ([str(self.deps)] if self.deps else [])
        return os.pathsep.join(parts)


def extract_safely(tar: tarfile.TarFile, dest: Path) -> None:
    """Extract ``tar`` into ``dest``, refusing members that would land outside it.

    Python's own ``data`` filter where this Python has it (3.11.4 and later); before that (Debian
    12's Python is 3.11.2) the same refusals by hand: no absolute or ``..`` paths, no links,
    devices or fifos - a bundle holds plain files and folders only.
    """
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
        return
    for member in tar.getmembers():
        parts = Path(member.name).parts
        if member.name.startswith(("/", "\\")) or ".." in parts:
            raise TaskError(f"refusing to unpack {member.name!r}: outside the folder")
        if not (member.isfile() or member.isdir()):
            raise TaskError(f"refusing to unpack {member.name!r}: not a file or a folder")
    tar.extractall(dest)  # every member checked above
