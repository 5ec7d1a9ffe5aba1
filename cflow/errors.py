"""What a failed shard of ``cflow.map`` or ``cflow.submit`` raises in the caller."""

from __future__ import annotations

import base64
import contextlib
import json
import linecache
import re
import sys
from dataclasses import dataclass
from typing import Any

from cflow.pickling import loads as load_value
from worker.pyfunc import DYNAMIC_CODE, ERROR_MARK, ItemTimedOut

_DYNAMIC_FRAME = re.compile(
    rf'^  File "{re.escape(DYNAMIC_CODE)}", line (?P<line>\d+), in (?P<name>\S+)$'
)
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
    """The worker's traceback with each ``<dynamic-code>`` frame named by the file of its
    module here and followed by its source line, where this process has that module."""
    where: dict[tuple[str, int], str] = {}
    for module, name, lineno in frames:
        file = getattr(sys.modules.get(str(module)), "__file__", None)
        if file:
            where[(str(name), int(lineno))] = file
    out: list[str] = []
    for line in trace.splitlines(keepends=True):
        found = _DYNAMIC_FRAME.match(line)
        file = where.get((found["name"], int(found["line"]))) if found else None
        if found is None or file is None:
            out.append(line)
            continue
        out.append(f'  File "{file}", line {found["line"]}, in {found["name"]}\n')
        source = linecache.getline(file, int(found["line"])).strip()
        if source:
            out.append(f"    {source}\n")
    return "".join(out)


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
