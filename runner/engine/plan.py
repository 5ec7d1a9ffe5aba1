"""What a submit would do, said before it does it: the bundle's size and the dry run."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from runner.config import Config
from worker.bundle import bundle_files, pack
from worker.protocol import Shard

BUNDLE_WARN_BYTES = 20 * 1024 * 1024  # a packed bundle above this is named with its largest files
LARGEST_SHOWN = 5
_LINE_BREAKING = {"Cc", "Zl", "Zp"}  # control characters, line and paragraph separators


@dataclass(frozen=True)
class BundleNote:
    size: int  # packed bytes
    files: int
    warning: str | None  # set when the bundle is over BUNDLE_WARN_BYTES
    # The bundle itself, (data, sha): the run stores this one rather than packing the folder
    # again (a large folder's gzip takes seconds).
    packed: tuple[bytes, str] | None = field(default=None, repr=False)

    @property
    def size_text(self) -> str:
        return human_bytes(self.size)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def describe_bundle(task_dir: Path) -> BundleNote:
    """Pack the task folder as submit would, and name its largest files when it is big."""
    data, sha = pack(task_dir)
    files = bundle_files(task_dir)
    warning = None
    if len(data) > BUNDLE_WARN_BYTES:
        largest = sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:LARGEST_SHOWN]
        named = ", ".join(
            f"{p.relative_to(task_dir).as_posix()} ({human_bytes(p.stat().st_size)})"
            for p in largest
        )
        warning = (
            f"the task bundle is {human_bytes(len(data))} (over {human_bytes(BUNDLE_WARN_BYTES)});"
            f" largest files: {named}. Keep data out of the task folder or list it in"
            " .cflowignore"
        )
    return BundleNote(size=len(data), files=len(files), warning=warning, packed=(data, sha))


def shown_input(name: str) -> str:
    """An input as a dry run prints it: as it is, or as a Python string literal (its ``repr``)
    when it holds a character that would break the ``id<TAB>input`` line (a newline, a tab, any
    other control character, a Unicode line separator), so each shard stays one line. An input
    is an absolute path or a URI, so one shown starting with a quote is always such a literal."""
    if any(unicodedata.category(char) in _LINE_BREAKING for char in name):
        return repr(name)
    return name


def dry_run(
    cfg: Config,
    task_dir: Path,
    shards: Iterable[Shard],
    workers: int | None,
    slots: int,
    out: IO[str],
) -> str:
    """Print each shard (``id<TAB>input or params``, the input as :func:`shown_input` shows
    it) on ``out``; return what would start."""
    import json

    count = 0
    for shard in shards:
        what = (
            shown_input(shard.input) if shard.input is not None else json.dumps(shard.params or {})
        )
        out.write(f"{shard.id}\t{what}\n")
        count += 1
    note = describe_bundle(task_dir)
    default = "the CPU count" if cfg.is_local else "the deployment's default"
    most = min(workers, count) if workers else f"min({count}, {default})"
    return (
        f"{count} shards; bundle {note.size_text} ({note.files} files); would start up to"
        f" {most} workers x {slots} slots on the {cfg.describe()}"
    )
