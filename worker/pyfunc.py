"""Calling a Python function shipped by value: the runtime of the tasks ``cflow`` generates.

A ``cflow.map`` or ``cflow.submit`` task folder holds :data:`FUNCTION_FILE` (the function,
pickled with cloudpickle, the modules it needs that the worker lacks inside it) and a ``task.py``
whose ``run(shard)`` calls :func:`call`. Each shard carries one item: pickled into its params
(:data:`ITEM_PARAM`, base64) when small, or as its input file when large. The return value is
pickled; a small one rides in the shard's ``result.json`` (:data:`INLINE_LIMIT`), a larger one is
the shard's output :data:`VALUE_FILE`. A failure leaves one :data:`ERROR_MARK` line in the
attempt's log (the exception's type, message, full traceback and, where it pickles, the exception
itself) before it is raised again, so the attempt fails as any task's does.

A **chunk** shard carries several items (:data:`CHUNK_PARAM`: the first item's index, how many,
how many tries each): the list of their pickles, pickled, rides in its params
(:data:`ITEMS_PARAM`) when small, else it is its input file. :func:`call` runs them one after
another in the one process and returns every item's outcome in one record, so the chunk commits
once: a value inline while the record has room (:data:`CHUNK_INLINE_BUDGET`), else at an offset
in the chunk's one output :data:`OVERFLOW_FILE`, and a value over :data:`INLINE_LIMIT` in an
output of its own, ``value-<index>.pkl``; an item that raised is tried again at once, up to its
tries (each retry said in the log), and then kept as failed, its :data:`ERROR_MARK` line naming
it (``item``) and where its part of the log starts (``log_from``, bytes), while the other items
go on. What is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``) fails the whole
chunk's attempt, as a crash or a timeout does; the chunk is then run again whole, its values
having died with the attempt, and from its second attempt on each item runs in a process of its
own forked from the host (:func:`_run_isolated`): an item that crashes it (``os._exit``, a
segfault, the OOM killer) then fails alone, after its tries, and the chunk's other items keep
their values, where before one such item failed every item of its chunk.

Never imports the runner or cflow: it runs on every worker.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pickle
import signal
import stat
import sys
import traceback
from pathlib import Path
from types import TracebackType
from typing import Any

from worker.taskapi import TaskShard

FUNCTION_FILE = "function.pkl"
VALUE_FILE = "value.pkl"  # a return value too large for result.json, in the shard's outputs
ITEM_PARAM = "item"  # params key of a small item: its pickle, base64
INLINE_LIMIT = 32 * 1024  # bytes of pickle kept in result.json (base64 fits its 64 KiB)
ERROR_MARK = "CFLOW-PYFUNC-ERROR "  # starts the log line that describes a failure, JSON after it
DYNAMIC_CODE = "<dynamic-code>"  # the file name cloudpickle gives the code it ships by value
ERROR_PICKLE_LIMIT = 256 * 1024  # bytes of a pickled exception put in the log; larger: none
CHUNK_PARAM = "chunk"  # params key of a chunk shard: {"first", "count", "tries"}
ITEMS_PARAM = "items"  # params key of a small chunk's items: a pickled list of their pickles
CHUNK_INLINE_BUDGET = 48 * 1024  # bytes of base64 a chunk's values take in its result.json
OVERFLOW_FILE = "values.pkl"  # a chunk's values its result.json has no room for, in one file

_loaded: dict[str, Any] = {}  # function file -> the function, once per warm process


def load_function(path: Path) -> Any:
    """The function pickled at ``path``, unpickled once per process."""
    key = str(path)
    if key not in _loaded:
        import cloudpickle  # the task's interpreter has it (the runner and gcp-worker extras)

        _loaded[key] = cloudpickle.loads(path.read_bytes())
    return _loaded[key]


def load_item(shard: TaskShard) -> Any:
    """The shard's item: from its params (small) or its input file (large)."""
    if ITEM_PARAM in shard.params:
        return pickle.loads(base64.b64decode(shard.params[ITEM_PARAM]))
    if shard.input is None:
        raise ValueError(f"shard {shard.id} carries no item (no params item, no input)")
    return pickle.loads(Path(shard.input).read_bytes())


def keep_value(shard: TaskShard, value: Any) -> dict[str, Any]:
    """The return value as ``result.json`` keeps it: inline when small, else a file output."""
    import cloudpickle

    data = cloudpickle.dumps(value)
    if len(data) <= INLINE_LIMIT:
        return {"pickle": base64.b64encode(data).decode("ascii")}
    Path(shard.output_dir, VALUE_FILE).write_bytes(data)
    return {"file": VALUE_FILE, "size": len(data)}


def describe_error(exc: BaseException) -> dict[str, Any]:
    """What the caller's ``ShardFailed`` is made of: type, message, traceback, the pickle."""
    kind = type(exc)
    record: dict[str, Any] = {
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(kind, exc, _user_frames(exc))),
        # cloudpickle names the code it ships "<dynamic-code>": each frame's module lets the
        # caller, which has the source, name the file and show the line.
        "frames": [
            [frame.f_globals.get("__name__"), frame.f_code.co_name, lineno]
            for frame, lineno in traceback.walk_tb(_user_frames(exc))
            if frame.f_code.co_filename == DYNAMIC_CODE
        ],
        "pickle": None,
    }
    try:
        import cloudpickle

        data = cloudpickle.dumps(exc)
    except Exception:  # an exception that will not pickle still fails with its text
        return record
    if len(data) <= ERROR_PICKLE_LIMIT:
        record["pickle"] = base64.b64encode(data).decode("ascii")
    return record


def _user_frames(exc: BaseException) -> TracebackType | None:
    """The traceback from the function's own frame on (this module's call frame dropped)."""
    tb = exc.__traceback__
    ours = (call.__code__, _run_item.__code__, _in_child.__code__)
    return tb.tb_next if tb is not None and tb.tb_frame.f_code in ours else tb


def _log(line: str) -> None:
    os.write(2, line.encode("utf-8", "backslashreplace"))  # fd 2: the attempt's log


def call(shard: TaskShard, function_file: Path) -> dict[str, Any]:
    """Run the shipped function on the shard's item; what ``run(shard)`` returns.

    Raises:
        BaseException: whatever the function raised, after its :data:`ERROR_MARK` line.
    """
    fn = load_function(function_file)
    if CHUNK_PARAM in shard.params:
        return call_chunk(shard, fn)
    item = load_item(shard)
    try:
        value = fn(item)
    except BaseException as exc:
        _log(ERROR_MARK + json.dumps(describe_error(exc)) + "\n")
        sys.stderr.flush()
        raise
    return keep_value(shard, value)


def partly_failed(value: Any) -> bool:
    """Whether a commit record's value is a chunk's holding an item that failed: the cross-run
    cache does not reuse it, so that item runs again."""
    chunk = value.get("chunk") if isinstance(value, dict) else None
    values = chunk.get("values") if isinstance(chunk, dict) else None
    return isinstance(values, list) and any("failed" in v for v in values if isinstance(v, dict))


def load_items(shard: TaskShard) -> list[Any]:
    """A chunk shard's items: from its params (small) or its input file."""
    if ITEMS_PARAM in shard.params:
        data = base64.b64decode(shard.params[ITEMS_PARAM])
    elif shard.input is not None:
        data = Path(shard.input).read_bytes()
    else:
        raise ValueError(f"chunk {shard.id} carries no items (no params items, no input)")
    pickles = pickle.loads(data)  # each item's own pickle: one item is read without the rest
    if not isinstance(pickles, list):
        raise ValueError(f"chunk {shard.id} carries a {type(pickles).__name__}, not a list")
    return [pickle.loads(one) for one in pickles]


def _log_size(appends: bool) -> int:
    """Bytes in the attempt's log so far (0 where fd 2 is no file): where an item's part of
    the log starts. Called before every item of a chunk, so it is kept to a plain loop.
    ``appends``: fd 2 is a file opened to append (:func:`_appends`), whose size a seek to its
    end gives without a stat (its offset moves there at each write anyway)."""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib.suppress costs a microsecond an item here
            stream.flush()
        except Exception:  # closed or replaced by the function: its own business
            pass
    try:
        return os.lseek(2, 0, os.SEEK_END) if appends else os.fstat(2).st_size
    except OSError:
        return 0


def _appends() -> bool:
    """Whether fd 2 is a regular file opened to append (the attempt's log, as hosts open it)."""
    try:
        return bool(fcntl.fcntl(2, fcntl.F_GETFL) & os.O_APPEND) and stat.S_ISREG(
            os.fstat(2).st_mode
        )
    except OSError:
        return False


def call_chunk(shard: TaskShard, fn: Any) -> dict[str, Any]:
    """Run the function on each item of a chunk shard; every item's outcome in one record.

    Raises:
        BaseException: what is not an ``Exception`` (the chunk's attempt fails whole).
    """
    spec = shard.params[CHUNK_PARAM]
    first, tries = int(spec["first"]), max(int(spec.get("tries", 1)), 1)
    kept: list[dict[str, Any]] = []
    budget = CHUNK_INLINE_BUDGET
    overflow = _Overflow(Path(shard.output_dir))
    appends = _appends()
    # The chunk's first attempt died whole (a crash, a timeout, a preemption): each item in a
    # process of its own now, so that one which crashes its process fails alone.
    run = _run_isolated if shard.attempt > 1 and hasattr(os, "fork") else _run_item
    try:
        for j, item in enumerate(load_items(shard)):
            budget -= run(fn, item, first + j, tries, kept, budget, overflow, shard, appends)
    finally:
        overflow.close()
    return {"chunk": {"first": first, "values": kept}}


def _run_item(
    fn: Any,
    item: Any,
    index: int,
    tries: int,
    kept: list[dict[str, Any]],
    budget: int,
    overflow: _Overflow,
    shard: TaskShard,
    appends: bool,
) -> int:
    """Run one item of a chunk, up to ``tries`` times, and keep its entry; the bytes of the
    record's room it took."""
    start = _log_size(appends)
    for attempt in range(1, tries + 1):
        try:
            value = fn(item)
            entry = _chunk_value(shard, index, value, budget, overflow)  # may not pickle
        except Exception as exc:  # fails its item like a raise
            if attempt < tries:
                _log(
                    f"cflow: item {index} raised {type(exc).__name__}: {exc}; try"
                    f" {attempt} of {tries}, running it again\n"
                )
                continue
            record = describe_error(exc) | {"item": index, "log_from": start}
            _log(ERROR_MARK + json.dumps(record) + "\n")
            kept.append({"failed": tries})
            return 0
        except BaseException as exc:
            record = describe_error(exc) | {"item": index, "log_from": start}
            _log(ERROR_MARK + json.dumps(record) + "\n")
            raise
        kept.append(entry)
        return len(entry.get("pickle", ""))
    return 0  # tries is at least 1: not reached


def _run_isolated(
    fn: Any,
    item: Any,
    index: int,
    tries: int,
    kept: list[dict[str, Any]],
    budget: int,
    overflow: _Overflow,
    shard: TaskShard,
    appends: bool,
) -> int:
    """:func:`_run_item`, each try in a child process forked for it: one that ends without
    its outcome (``os._exit``, a signal: a segfault, the OOM killer) fails this item's try,
    and what the item raises, ``SystemExit`` included, fails this item only."""
    start = _log_size(appends)
    for attempt in range(1, tries + 1):
        kind, outcome = _in_child(fn, item)
        if kind == "value":
            entry = _kept(shard, index, outcome, budget, overflow)
            kept.append(entry)
            return len(entry.get("pickle", ""))
        said = outcome["message"] if kind == "crashed" else f"raised {outcome['type']}"
        if attempt < tries:
            _log(f"cflow: item {index} {said}; try {attempt} of {tries}, running it again\n")
            continue
        _log(ERROR_MARK + json.dumps(outcome | {"item": index, "log_from": start}) + "\n")
        kept.append({"failed": tries})
        return 0
    return 0  # tries is at least 1: not reached


def _in_child(fn: Any, item: Any) -> tuple[str, Any]:
    """``fn(item)`` in a child process forked now: ``("value", its pickle)``, ``("raised",
    the error record)``, or ``("crashed", a record saying how the child ended)``."""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - as in _log_size
            stream.flush()  # nothing buffered is written twice
        except Exception:
            pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the item's own process
        os.close(read)
        try:
            try:
                data = b"V" + _pickled(fn(item))
            except BaseException as exc:  # this item's failure, whatever it is
                data = b"E" + json.dumps(describe_error(exc)).encode()
            with os.fdopen(write, "wb") as out:
                out.write(data)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as got:
        data = got.read()
    _, status = os.waitpid(pid, 0)
    if data[:1] == b"V":
        return "value", data[1:]
    if data[:1] == b"E":
        return "raised", json.loads(data[1:])
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        how = f"was killed by {name}" + (" (the OOM killer, say)" if sig == signal.SIGKILL else "")
    else:
        how = f"exited with code {os.WEXITSTATUS(status)}"
    message = f"the process running it {how} before it returned"
    return "crashed", {"type": "ItemCrashed", "message": message, "traceback": "", "pickle": None}


class _Overflow:
    """The values of a chunk its record has no room for (each up to :data:`INLINE_LIMIT`),
    one pickle after another in its output :data:`OVERFLOW_FILE`: one file a chunk, which
    the caller reads once, instead of a file an item."""

    def __init__(self, folder: Path):
        self.path = folder / OVERFLOW_FILE
        self.size = 0
        self._file: Any = None

    def add(self, data: bytes) -> dict[str, Any]:
        if self._file is None:
            self._file = self.path.open("ab")
        self._file.write(data)
        self.size += len(data)
        return {"file": OVERFLOW_FILE, "at": self.size - len(data), "size": len(data)}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _chunk_value(
    shard: TaskShard, index: int, value: Any, budget: int, overflow: _Overflow
) -> dict[str, Any]:
    """Item ``index``'s value as its chunk's record keeps it: inline while the record has
    room, else in the chunk's :data:`OVERFLOW_FILE`, and one over :data:`INLINE_LIMIT` in an
    output of its own, ``value-<index>.pkl`` (read when it is asked for, when over 1 MB)."""
    return _kept(shard, index, _pickled(value), budget, overflow)


def _pickled(value: Any) -> bytes:
    try:  # the standard pickler where it can (several times faster on small values)
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        import cloudpickle  # a lambda, a class shipped by value

        return cloudpickle.dumps(value)


def _kept(
    shard: TaskShard, index: int, data: bytes, budget: int, overflow: _Overflow
) -> dict[str, Any]:
    """:func:`_chunk_value` of a value pickled already (``data``)."""
    text = base64.b64encode(data).decode("ascii")
    if len(data) > INLINE_LIMIT:
        name = f"value-{index}.pkl"
        Path(shard.output_dir, name).write_bytes(data)
        return {"file": name, "size": len(data)}
    if len(text) <= budget:
        return {"pickle": text}
    return overflow.add(data)
