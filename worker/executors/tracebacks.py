"""A task's traceback as its author wants to read it: their own frames, their own file names.

An exception raised by ``run(shard)`` or ``combine(paths, out)`` unwinds through the frames of
the process that called it (the warm host, the zygote, ``importlib`` loading ``task.py``) and
names the task's files where the worker unpacked them (``/tmp/cflow/bundles/<sha256>/task.py``).
:func:`task_traceback` leaves out the calling frames before the first frame of the task and
names the files of the task folder relative to it (``task.py``, ``lib/helper.py``); frames of
libraries the task calls stay as they are. Runs on the interpreter of a container image too
(Python 3.9).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

# What calls the task: the worker package (by the path it was imported from, or its real one),
# and the interpreter's import and ``-m`` machinery.
_PACKAGE = Path(__file__).parent.parent
_CALLING = (f"{_PACKAGE}/", f"{_PACKAGE.resolve()}/", "<frozen importlib", "<frozen runpy")


def task_root() -> Path | None:
    """The folder of the task module this process loaded (None: none loaded)."""
    module = sys.modules.get("task")
    path = getattr(module, "__file__", None)
    return Path(path).resolve().parent if path else None


def task_traceback(exc: BaseException, root: Path | None = None) -> str:
    """``exc``'s traceback, chained exceptions included, without the frames that called the
    task and with the files under ``root`` (default: :func:`task_root`) named relative to it."""
    folder = root if root is not None else task_root()
    # The task's files by the path they were loaded from, or by the real one (longest first).
    prefixes = [] if folder is None else [str(folder) + "/", str(folder.resolve()) + "/"]
    shown = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    _trim(shown, sorted(set(prefixes), key=len, reverse=True), set())
    return "".join(shown.format())


def _trim(shown: traceback.TracebackException, prefixes: list[str], seen: set[int]) -> None:
    if id(shown) in seen:  # a cycle of causes
        return
    seen.add(id(shown))
    frames = list(shown.stack)
    first = next((n for n, f in enumerate(frames) if not f.filename.startswith(_CALLING)), None)
    kept = frames[first:] if first is not None else frames  # ours alone: all of it
    for frame in kept:
        _ = frame.line  # read the source line before the file is renamed
        prefix = next((p for p in prefixes if frame.filename.startswith(p)), None)
        if prefix is not None:
            frame.filename = frame.filename[len(prefix) :]
    shown.stack = traceback.StackSummary.from_list(kept)
    for linked in (shown.__cause__, shown.__context__, *(getattr(shown, "exceptions", None) or [])):
        if linked is not None:
            _trim(linked, prefixes, seen)


TRACEBACK_HEAD = "Traceback (most recent call last):"


def exception_line(exc: BaseException) -> str:
    """``Type: message`` for a failure's reason, from the message's first line: the lines
    after it (a message of several, its notes) are in the log, and counted here. The last line
    alone said ``line three`` for ``Multi("line one\\nline two\\nline three")``, a note for
    an exception with one, and what followed a carriage return."""
    # The two-argument form: Python 3.9 (an image's interpreter) has no other.
    lines = "".join(traceback.format_exception_only(type(exc), exc)).split("\n")
    while lines and lines[0].startswith(" "):  # a SyntaxError's place comes before its line
        lines.pop(0)
    return first_of(lines)


def first_of(lines: list[str]) -> str:
    """The first of an exception's lines as printed, the others counted: a message that
    starts on a later line (``ValueError("\\nafter a blank")``) joined to its type. Control
    characters are escaped (a terminal's colour codes in a message would reach the terminal
    that shows the reason: ``runner status``)."""
    kept = [line.rstrip() for line in lines if line.strip()]
    if not kept:
        return ""
    first = kept.pop(0)
    if first.endswith(":") and kept:  # ``Type:`` alone: its message came on the next line
        first = f"{first} {kept.pop(0).strip()}"
    more = len(kept)
    return printable(first) + (f" (+{more} more line{'s' * (more > 1)} in the log)" if more else "")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\r``, ``\\x1b``), tabs kept."""
    return "".join(
        ch if (ch >= " " and ch != "\x7f") or ch == "\t" else ch.encode("unicode_escape").decode()
        for ch in text
    )


def traceback_line(lines: list[str]) -> str | None:
    """The exception line of the last Python traceback in ``lines`` (a log's tail), as
    :func:`exception_line` gives it; None when no traceback ends the log."""
    heads = [n for n, line in enumerate(lines) if line.rstrip("\r") == TRACEBACK_HEAD]
    if not heads:
        return None
    body = lines[heads[-1] + 1 :]
    frames = 0
    while frames < len(body) and (body[frames].startswith(" ") or not body[frames].strip()):
        frames += 1
    rest = [line for line in body[frames:] if not line.startswith("cflow: ")]
    return first_of(rest) or None
