"""What a failed shard of ``cflow.map`` or ``cflow.submit`` raises in the caller."""

from __future__ import annotations

import base64
import contextlib
import json
import linecache
import os
import re
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from cflow.own import is_installed
from cflow.pickling import loads as load_value
from worker.pyfunc import DYNAMIC_CODE, ERROR_MARK, ItemTimedOut
from worker.pyfunc.shared import said

_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>\S+)$')
LOG_TAIL_LINES = 20  # lines of the attempt's log a ShardFailed carries


class RemoteError(Exception):
    """Stands in for an exception raised on a worker whose class cannot be loaded here (a class
    defined in a module this process lacks, or one that does not unpickle): its type's name,
    message and traceback, as text."""

    def __init__(self, type_name: str, message: str, traceback: str = ""):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback = traceback


class ShardFailed(Exception):
    """A shard used up its attempts. Its fields:

    - ``index``: the item's position in the input;
    - ``run_id`` and ``shard_id``: where to look with ``runner status`` or ``runner logs``;
    - ``type_name`` and ``message``: the exception's type (``module.Name``) and text;
    - ``traceback``: the traceback on the worker, as text;
    - ``log_tail``: the last lines of the attempt's log;
    - ``exception``: the exception itself where its class unpickles here, else a
      :class:`RemoteError` with the same text (also the ``__cause__``).
    """

    def __init__(
        self,
        *,
        index: int,
        run_id: str,
        shard_id: str,
        type_name: str,
        message: str,
        traceback: str,
        log_tail: str,
        exception: BaseException,
    ):
        super().__init__(f"item {index} failed: {type_name}: {message}")
        self.index = index
        self.run_id = run_id
        self.shard_id = shard_id
        self.type_name = type_name
        self.message = message
        self.traceback = traceback
        self.log_tail = log_tail
        self.exception = exception
        self.__cause__ = exception


@dataclass(frozen=True)
class _Described:
    type_name: str
    message: str
    traceback: str
    exception: BaseException


def _named(trace: str, frames: list[list[Any]]) -> str:
    """The worker's traceback with each frame named by the file it was defined in, in the
    process that pickled the function, and followed by its source line where the worker had
    none to show and this process has the file.

    The function's code keeps its file's name (:mod:`cflow.pickling`). A ``<dynamic-code>``
    frame (code pickled as cloudpickle pickles it: a class shipped with items for the cache,
    a run made before) is named by what the worker recorded of it (``frames``: its module,
    name, line, and the module's file where it says), else by the file of its module here,
    except ``__main__``, which here is another script than the one that submitted the run
    where this process only attached to it: such a frame stays ``<dynamic-code>``. A frame of
    a chained exception (``raise ... from``) whose line was not recorded is named by a
    recorded frame of the same function."""
    where: dict[tuple[str, int], str] = {}
    by_name: dict[str, set[str]] = {}
    for module, name, lineno, *known in frames:
        file = known[0] if known and known[0] else None
        if file is None and str(module) != "__main__":
            file = getattr(sys.modules.get(str(module)), "__file__", None)
        if isinstance(file, str) and file:
            where[(str(name), int(lineno))] = file
            by_name.setdefault(str(name), set()).add(file)
    lines = trace.splitlines(keepends=True)
    out: list[str] = []
    for at, line in enumerate(lines):
        found = _FRAME.match(line)
        if found is None:
            out.append(line)
            continue
        file, lineno, name = found["file"], int(found["line"]), found["name"]
        if file == DYNAMIC_CODE:
            files = by_name.get(name, set())
            file = where.get((name, lineno)) or (next(iter(files)) if len(files) == 1 else file)
        named = f'  File "{file}", line {lineno}, in {name}\n'
        out.append(line if file == found["file"] else named)
        shown = at + 1 < len(lines) and lines[at + 1].startswith("    ")
        if not shown and _own_file(file):
            source = linecache.getline(file, lineno).strip()
            if source:
                out.append(f"    {source}\n")
    return "".join(out)


def _own_file(file: str) -> bool:
    """Whether this process may show ``file``'s lines in a worker's traceback: the caller's
    own (a script, a module not installed, a notebook cell IPython keeps in ``linecache``),
    not ``<dynamic-code>`` nor an installed module (the worker's version of it may differ)."""
    if os.path.isfile(file):
        return not is_installed(file)
    return file in linecache.cache


_ATTEMPT_TIMEOUT = re.compile(r"timed out after (\S+)s")  # the worker's reason (attempt.py)
TIMED_OUT = f"{ItemTimedOut.__module__}.{ItemTimedOut.__qualname__}"


def read_failure(log: str, reason: str) -> tuple[_Described, str]:
    """The failure described in an attempt's log (the function's own record when it raised;
    else the worker's ``reason``: a timeout, a crash), and the log's tail without it."""
    record = None
    kept: list[str] = []
    for line in log.splitlines():
        if line.startswith(ERROR_MARK):
            try:
                record = json.loads(line[len(ERROR_MARK) :])
            except ValueError:
                record = None
        else:
            kept.append(line)
    tail = "\n".join(kept[-LOG_TAIL_LINES:])
    if not isinstance(record, dict):
        late = _ATTEMPT_TIMEOUT.fullmatch(reason)
        if late:  # a shard of one item: its timeout is the item's, as in a chunk
            text = f"it ran past its timeout of {late[1]} s"
            return _Described(TIMED_OUT, text, "", ItemTimedOut(text)), tail
        name, _, text = reason.partition(": ")
        if not text:
            name, text = "ShardError", reason
        return _Described(name, text, "", RemoteError(name, text)), tail
    name, text = str(record.get("type")), str(record.get("message"))
    trace = _named(str(record.get("traceback") or ""), record.get("frames") or [])
    exc: BaseException = RemoteError(name, text, trace)
    if record.get("pickle"):
        # Where its class is not importable here, or will not unpickle, the stand-in stays.
        with contextlib.suppress(Exception):
            exc = load_value(base64.b64decode(record["pickle"]))
    return _Described(name, text, trace, exc), tail


def shard_failed(log: str, reason: str, *, index: int, run_id: str, shard_id: str) -> ShardFailed:
    """Item ``index``'s :class:`ShardFailed`, from its attempt's log (:func:`read_failure`)."""
    described, tail = read_failure(log, reason)
    return ShardFailed(
        index=index,
        run_id=run_id,
        shard_id=shard_id,
        type_name=described.type_name,
        message=described.message,
        traceback=described.traceback,
        log_tail=tail,
        exception=described.exception,
    )


def unloadable(error: Exception, *, index: int, run_id: str, shard_id: str) -> ShardFailed:
    """Item ``index``'s :class:`ShardFailed` where its value came back but will not unpickle
    here (``error``: what unpickling raised): the function returned an instance of a module
    only the worker had, or a class whose ``__setstate__`` raises in this process. Only that
    item fails; the others' values still come back."""
    kind = type(error)
    why = ""
    if isinstance(error, ImportError) and error.name:
        why = (
            "; the worker had that module and this process cannot import it: make it"
            " importable here, or return plain values (dicts, lists, numbers)"
        )
    return ShardFailed(
        index=index,
        run_id=run_id,
        shard_id=shard_id,
        type_name=f"{kind.__module__}.{kind.__qualname__}",
        message="its value was returned but cannot be loaded in this process: unpickling it"
        f" raised {kind.__name__}: {said(error)}{why}",
        traceback="".join(traceback.format_exception(error)),
        log_tail="",
        exception=error,
    )
