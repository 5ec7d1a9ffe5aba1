"""Where shards come from: input files, a JSON-lines params file, or a count.

Input files are named by ``--inputs``, repeatable, each one of: a glob (``data/*.csv``, ``**``
recurses), ``@FILE`` (a list of paths, one a line, UTF-8 with or without the BOM a Windows
editor starts it with) or ``-`` (the same list on stdin), or a ``gs://bucket/glob`` on Google
Cloud. Local files are found and checked at once (:meth:`Inputs.gather`): each is taken as
matched, a symlink under its own name, and anything that is not a readable file is refused by
name before a run is made. Cloud Storage globs are listed when the shards are read.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import stat
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from worker.errors import InputError
from worker.protocol import Shard, shard_id_for_index

REMOTE_SCHEMES = ("gs://",)
STDIN = "-"  # --inputs -: a list of paths on stdin
LIST_MARK = "@"  # --inputs @FILE: a list of paths in FILE
BOM = "\ufeff"  # a byte-order mark before a list's first line (Windows editors): not a path
BOM_BYTES = BOM.encode()  # the same before a params file's first line
ID_STEM_LIMIT = 40  # characters of a file's name kept in its shard's id
REFUSED_SHOWN = 50  # inputs that are not files named one a line; the rest counted
REPEATS_SHOWN = 3  # inputs that repeat a file named in the note; the rest counted

Say = Callable[[str], None]


def input_shard_id(path: str) -> str:
    """A stable id for a file input: its name, readable, and a hash of the whole path or URI.

    The same input always gets the same id, whatever else is in the run. Letters and digits of
    any script are kept (``日本.csv-…``); everything else that is not ``.``, ``_`` or ``-``
    becomes ``-``, so the id is one path component and a safe object name and message
    attribute even for names with spaces, ``$;|`` or control characters.
    """
    name = path.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    stem = readable_stem(name)
    return f"{stem}-{digest}" if stem else digest


def readable_stem(name: str, limit: int = ID_STEM_LIMIT) -> str:
    """``name`` as id characters: NFKC-normalized, letters, digits and marks of any script and
    ASCII ``._-`` kept, every run of anything else one ``-``; at most ``limit`` characters and
    never starting or ending with ``-`` or ``.``."""
    out: list[str] = []
    for char in unicodedata.normalize("NFKC", name):
        if _id_char(char):
            out.append(char)
        elif not out or out[-1] != "-":
            out.append("-")
    return "".join(out).strip("-.")[:limit].strip("-.")


def _id_char(char: str) -> bool:
    if char.isascii():
        return char.isalnum() or char in "._-"
    return unicodedata.category(char)[0] in "LNM"  # letters, numbers, combining marks


@dataclass
class _Part:
    """One ``--inputs``: a glob's or a list's inputs (local ones found and checked), or a
    ``gs://`` glob listed when the shards are read."""

    given: str  # as the user wrote it
    items: list[str] = field(default_factory=list)  # absolute local paths as matched, gs:// URIs
    remote_glob: str | None = None

    @property
    def remote(self) -> bool:
        return self.remote_glob is not None or any("://" in item for item in self.items)


@dataclass
class Inputs:
    """Every ``--inputs``, in the order given; local files already found and checked."""

    parts: list[_Part]
    repeats: list[str] = field(default_factory=list)  # inputs dropped as the same file again

    @classmethod
    def gather(cls, specs: Sequence[str], *, stdin: IO[str] | None = None) -> Inputs:
        """Find and check the local inputs of ``specs`` (globs, ``@FILE``, ``-``, gs:// globs).

        Raises:
            InputError: a glob matches nothing, a list is missing or empty, ``-`` is given
                twice, or inputs are not readable files (each named on a line of its own).
        """
        if list(specs).count(STDIN) > 1:
            raise InputError("--inputs - is given twice; stdin holds one list")
        parts = [_part(spec, stdin) for spec in specs]
        gathered = cls(parts)
        gathered._check_local()
        return gathered

    @property
    def remote(self) -> list[str]:
        """The ``--inputs`` that name Cloud Storage objects."""
        return [part.given for part in self.parts if part.remote]

    def _check_local(self) -> None:
        """Refuse every local input that is not a readable file; keep one input per file."""
        refused: list[str] = []
        first: dict[tuple[int, int], str] = {}
        for part in self.parts:
            kept = []
            for path in part.items:
                if "://" in path:  # a gs:// URI of a list: taken as given
                    kept.append(path)
                    continue
                try:
                    st = os.stat(path)
                except OSError as exc:
                    refused.append(f"{_shown(path)}: {_missing(path, exc)}")
                    continue
                problem = _not_a_file(path, st)
                if problem:
                    refused.append(f"{_shown(path)}: {problem}")
                    continue
                key = (st.st_dev, st.st_ino)
                if key in first:
                    self.repeats.append(_repeat(_shown(path), _shown(first[key])))
                    continue
                first[key] = path
                kept.append(path)
            part.items = kept
        if refused:
            more = len(refused) - REFUSED_SHOWN
            lines = refused[:REFUSED_SHOWN] + ([f"... and {more} more"] if more > 0 else [])
            what = (
                "input is not a readable file"
                if len(refused) == 1
                else ("inputs are not readable files")
            )
            raise InputError(
                f"{len(refused)} {what}; name files only (nothing was started):\n  "
                + "\n  ".join(lines)
            )

    def shards(self, lister: RemoteLister | None = None, say: Say | None = None) -> Iterator[Shard]:
        """One shard per file, in the order given (each glob's matches sorted); a file reached
        twice is one shard, and ``say`` is told so in one line once every input is read.

        Raises:
            InputError: a ``gs://`` input without the Google Cloud backend (``lister``), or a
                ``gs://`` glob that matches nothing; both before the first shard.
        """
        sources = [self._source(part, lister) for part in self.parts]
        ids: set[str] = set()
        uris: set[str] = set()
        repeats = list(self.repeats)
        index = 0
        for source in sources:
            for uri in source:
                if "://" in uri:  # local files are one per file already
                    if uri in uris:
                        repeats.append(_repeat(uri, uri))
                        continue
                    uris.add(uri)
                shard_id = input_shard_id(uri)
                if shard_id in ids:  # two inputs whose names and hashes collide: vanishingly rare
                    shard_id = f"{shard_id}-{index}"
                ids.add(shard_id)
                yield Shard(id=shard_id, index=index, input=uri)
                index += 1
        if repeats and say is not None:
            say(_repeats_note(repeats))

    @staticmethod
    def _source(part: _Part, lister: RemoteLister | None) -> Iterator[str]:
        if not part.remote:
            return iter(part.items)
        if lister is None:
            raise InputError(
                f"--inputs {part.given} is a Cloud Storage input; it needs the Google Cloud backend"
            )
        if part.remote_glob is None:
            return iter(part.items)
        listed = lister(part.remote_glob)
        head = next(listed, None)  # every glob must match: checked before the first shard
        if head is None:
            raise InputError(
                f"--inputs {part.remote_glob!r} matches no objects; check the path and quote"
                " the glob"
            )
        return itertools.chain([head], listed)


def _part(spec: str, stdin: IO[str] | None) -> _Part:
    if spec.startswith(REMOTE_SCHEMES):
        return _Part(spec, remote_glob=spec)
    if spec == STDIN:
        stream = stdin
        if stream is None:
            raise InputError("--inputs - reads a list of paths from stdin, and there is none")
        text = stream.read().removeprefix(BOM)
        return _listed(spec, text.splitlines(), Path.cwd(), "stdin")
    if spec.startswith(LIST_MARK):
        list_file = Path(os.path.expanduser(spec[1:]))
        try:
            text = list_file.read_text(encoding="utf-8-sig")  # a leading BOM dropped
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InputError(f"--inputs {spec}: cannot read the list {list_file} ({why})") from None
        return _listed(spec, text.splitlines(), Path(os.path.abspath(list_file)).parent, spec)
    matches = sorted(
        os.path.abspath(p) for p in glob.iglob(os.path.expanduser(spec), recursive=True)
    )
    if not matches:
        raise InputError(f"--inputs {spec!r} matches no files; check the path and quote the glob")
    return _Part(spec, items=matches)


def _listed(spec: str, lines: list[str], base: Path, where: str) -> _Part:
    """One path a line: blank lines and ``#`` comments skipped, relative paths from ``base``."""
    items: list[str] = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        remote = entry.startswith(REMOTE_SCHEMES)
        path = entry if remote else os.path.abspath(base / os.path.expanduser(entry))
        if not remote and entry != line and not os.path.lexists(path):
            # A name with spaces at its ends (``trail.csv ``) is its own where only it is there.
            kept = os.path.abspath(base / os.path.expanduser(line.rstrip("\r")))
            path = kept if os.path.lexists(kept) else path
        items.append(path)
    if not items:
        raise InputError(f"--inputs {spec}: {where} lists no paths (one path a line)")
    return _Part(spec, items=items)


def _shown(path: str) -> str:
    """A path as the user would write it: relative to the working folder when under it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _missing(path: str, exc: OSError) -> str:
    if os.path.islink(path):
        return f"a broken link (to {os.readlink(path)})"
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    return f"cannot be read ({exc.strerror})"


def _not_a_file(path: str, st: os.stat_result) -> str | None:
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None if os.access(path, os.R_OK) else "not readable (permission denied)"
    kinds = {
        stat.S_ISDIR: "folder",
        stat.S_ISFIFO: "fifo",
        stat.S_ISSOCK: "socket",
        stat.S_ISCHR: "character device",
        stat.S_ISBLK: "block device",
    }
    kind = next((name for test, name in kinds.items() if test(mode)), "special file")
    return f"a link to a {kind}" if os.path.islink(path) else f"a {kind}"


def _repeat(shown: str, first: str) -> str:
    return f"{shown} (again)" if shown == first else f"{shown} (the same file as {first})"


def _repeats_note(repeats: list[str]) -> str:
    more = len(repeats) - REPEATS_SHOWN
    named = ", ".join(repeats[:REPEATS_SHOWN]) + (f" and {more} more" if more > 0 else "")
    what = "input reaches a file" if len(repeats) == 1 else "inputs reach a file"
    return f"{len(repeats)} {what} already taken and run once: {named}"


def from_glob(pattern: str, *, lister: RemoteLister | None = None) -> Iterator[Shard]:
    """One shard per file matching one glob, in sorted order (``Inputs`` with one glob)."""
    yield from Inputs.gather([pattern]).shards(lister)


def from_params(path: Path) -> Iterator[Shard]:
    """One shard per non-blank line of a JSON-lines file (UTF-8, with or without a leading BOM);
    each line must be a JSON object. A file that cannot be read, or a line that is not UTF-8 or
    nests deeper than Python's JSON reader goes, is refused naming the file and line."""
    try:
        odd = _not_a_file(str(path), path.stat())
    except FileNotFoundError:
        if not path.is_symlink():
            raise InputError(f"--params file {path} does not exist") from None
        odd = f"a broken link (to {os.readlink(path)})"
    except OSError as exc:
        odd = f"not readable ({exc.strerror})"
    if odd is not None:
        raise InputError(f"--params {path} is {odd}; give a JSON-lines file, one object a line")
    lines: list[tuple[int, dict[str, object]]] = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            params = _params_line(path, number, raw.removeprefix(BOM_BYTES) if number == 1 else raw)
            if params is not None:
                lines.append((number, params))
    if not lines:
        raise InputError(f"--params file {path} has no lines; add one JSON object per shard")
    for index, (_, params) in enumerate(lines):
        yield Shard(id=shard_id_for_index(index, len(lines)), index=index, params=params)


def _params_line(path: Path, number: int, raw: bytes) -> dict[str, object] | None:
    """Line ``number`` of a params file as its shard's params (None for a blank line)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{path} line {number} is not UTF-8 text (byte {err.object[err.start]:#04x} at"
            f" column {err.start + 1}); save the file as UTF-8"
        ) from None
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{path} line {number} is not valid JSON: {err.msg}") from None
    except RecursionError:
        raise InputError(
            f"{path} line {number} nests arrays or objects too deeply to read; flatten it"
        ) from None
    if not isinstance(value, dict):
        raise InputError(f"{path} line {number} must be a JSON object, not {type(value).__name__}")
    return value


def from_count(count: int) -> Iterator[Shard]:
    if count < 1:
        raise InputError(f"--shards must be at least 1, not {count}")
    for index in range(count):
        yield Shard(id=shard_id_for_index(index, count), index=index, params={"index": index})


class RemoteLister:
    """Lists ``gs://`` URIs matching a glob (provided by the Google Cloud backend)."""

    def __call__(self, pattern: str) -> Iterator[str]:  # pragma: no cover - interface
        raise NotImplementedError
