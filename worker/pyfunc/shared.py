"""What the Python-function runtime's parts share (:mod:`worker.pyfunc`): where a function,
its items and its values go, and how a failure is told to the caller (an :data:`ERROR_MARK`
line in the attempt's log).

Never imports the runner or cflow: it runs on every worker.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import pickle
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from worker.pyfunc.calling import callable_as_shipped
from worker.pyfunc.modules import adopt, forget, own_names
from worker.taskapi import TaskShard

FUNCTION_FILE = "function.pkl"
# Beside the function in a local run's task folder (no image): the caller's working folder,
# where the function's items run (enter_folder)
FOLDER_FILE = "folder.txt"
VALUE_FILE = "value.pkl"  # a return value too large for result.json, in the shard's outputs
ITEM_PARAM = "item"  # params key of a small item: its pickle, base64
INLINE_LIMIT = 32 * 1024  # bytes of pickle kept in result.json (base64 fits its 64 KiB)
ERROR_MARK = "CFLOW-PYFUNC-ERROR "  # starts the log line that describes a failure, JSON after it
DYNAMIC_CODE = "<dynamic-code>"  # the file name cloudpickle gives the code it ships by value
ERROR_PICKLE_LIMIT = 256 * 1024  # bytes of a pickled exception put in the log; larger: none
CHUNK_PARAM = "chunk"  # params key of a chunk shard: {"first", "count", "tries"}
ITEMS_PARAM = "items"  # params key of a small chunk's items: a pickled list of their pickles
# params key of the caller's own classes and functions its items name (base64 of a pickle by
# value of {"module\0qualname": object}): what a worker that is not the caller's fork lacks
CLASSES_PARAM = "classes"
CLASSES_KEY_PARAM = "classes_key"  # what the cache keys them on (without their line numbers)
# params key, with the cache, of the files the items name (cflow.inputs): the cache keys on
# their fingerprints as well (runner.engine.cache); the worker has no use for it
FILES_PARAM = "files"
CHUNK_INLINE_BUDGET = 48 * 1024  # bytes of base64 a chunk's values take in its result.json
OVERFLOW_FILE = "values.pkl"  # a chunk's values its result.json has no room for, in one file
# A chunk's entries (one an item) when they are too many for its result.json: the record then
# says where they are, how many and how many failed (a chunk of thousands of items)
ENTRIES_FILE = "entries.json"
CHUNK_RECORD_LIMIT = 60 * 1024  # bytes of JSON a chunk's record keeps (under RETURN_LIMIT)
# A chunk whose every item succeeded with a small value keeps their pickles as one pickled list,
# base64, under this key of its record (with "count"), while they take at most COMPACT_BYTES
# (each counted PICKLED_ITEM_COST more: its length in the list's pickle), as much as the
# entries' inline budget holds once base64
CHUNK_PICKLES = "pickles"
COMPACT_BYTES = CHUNK_INLINE_BUDGET * 3 // 4
PICKLED_ITEM_COST = 5

_HERE = os.path.dirname(__file__)  # this package: its frames are not the function's
# Nor are the event loop's that runs an async function's coroutine (Awaited), before its own
_CALLERS = (_HERE, os.path.join(os.path.dirname(os.__file__), "asyncio"))
_loaded: dict[str, Any] = {}  # function file -> the function, once per warm process


def load_function(path: Path) -> Any:
    """The function pickled at ``path``, unpickled once per process."""
    key = str(path)
    if key not in _loaded:
        import cloudpickle  # the task's interpreter has it (the runner and gcp-worker extras)

        own = own_names(path)
        forget(own)  # a fork's copies of the caller's modules: an import in fn reads the file
        fn = cloudpickle.loads(path.read_bytes())
        adopt(fn, own)  # its classes are their modules' here: pickling one inside fn works
        _loaded[key] = callable_as_shipped(fn)
    return _loaded[key]


def enter_folder(function_file: Path) -> None:
    """Make the caller's working folder this process's current one where the task folder
    names one (:data:`FOLDER_FILE`) and it is a folder here: a relative path the function is
    given, or opens itself, means what it meant where the map was called (as in a
    ``multiprocessing`` pool). Elsewhere the attempt stays in its own empty folder."""
    named = function_file.with_name(FOLDER_FILE)
    with contextlib.suppress(OSError, ValueError):  # none named, or no such folder here
        os.chdir(named.read_text(encoding="utf-8"))


def load_item(shard: TaskShard) -> Any:
    """The shard's item: from its params (small) or its input file (large)."""
    loads = _loader(shard)
    if ITEM_PARAM in shard.params:
        return loads(base64.b64decode(shard.params[ITEM_PARAM]))
    if shard.input is None:
        raise ValueError(f"shard {shard.id} carries no item (no params item, no input)")
    return loads(Path(shard.input).read_bytes())


class _Unpickler(pickle.Unpickler):
    """Finds the caller's own classes and functions an item names among those that came with
    it, by value (:data:`CLASSES_PARAM`)."""

    def __init__(self, data: bytes, classes: dict[str, Any]):
        super().__init__(io.BytesIO(data))
        self._classes = classes

    def find_class(self, module: str, name: str) -> Any:
        found = self._classes.get(f"{module}\0{name}")
        return found if found is not None else super().find_class(module, name)


def _loader(shard: TaskShard) -> Callable[[bytes], Any]:
    """How the shard's items are unpickled: with the classes that came with them, if any."""
    shipped = shard.params.get(CLASSES_PARAM)
    if shipped is None:
        return pickle.loads
    import cloudpickle

    classes = cloudpickle.loads(base64.b64decode(shipped))
    return lambda data: _Unpickler(data, classes).load()


def keep_value(shard: TaskShard, value: Any) -> dict[str, Any]:
    """The return value as ``result.json`` keeps it: inline when small, else a file output.

    Raises:
        UnpicklableValue: it cannot be pickled.
    """
    data = pickled(value)
    if len(data) <= INLINE_LIMIT:
        return {"pickle": base64.b64encode(data).decode("ascii")}
    Path(shard.output_dir, VALUE_FILE).write_bytes(data)
    return {"file": VALUE_FILE, "size": len(data)}


def describe_error(exc: BaseException) -> dict[str, Any]:
    """What the caller's ``ShardFailed`` is made of: type, message, traceback, the pickle."""
    kind = type(exc)
    record: dict[str, Any] = {
        "type": f"{kind.__module__}.{kind.__qualname__}",
        "message": said(exc),
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


def said(exc: BaseException) -> str:
    """``str(exc)``, or what Python prints where that raises (an exception whose ``__str__``
    is broken fails its item with this, not with the error of its ``__str__``)."""
    try:
        return str(exc)
    except Exception:
        return "<exception str() failed>"


def _user_frames(exc: BaseException) -> TracebackType | None:
    """The traceback from the function's own frame on (the frames of this package that called
    it dropped)."""
    tb = exc.__traceback__
    while tb is not None and os.path.dirname(tb.tb_frame.f_code.co_filename) in _CALLERS:
        tb = tb.tb_next
    return tb


def log(line: str) -> None:
    os.write(2, line.encode("utf-8", "backslashreplace"))  # fd 2: the attempt's log


def chunk_counts(value: Any) -> tuple[int, int] | None:
    """A chunk's commit record's value, counted: its items and how many of them failed, in
    whichever form the record keeps them (one list, an entry an item, or entries in a file
    the record counts); None: not a chunk's."""
    chunk = value.get("chunk") if isinstance(value, dict) else None
    if not isinstance(chunk, dict):
        return None
    if CHUNK_PICKLES in chunk:  # every item succeeded
        return int(chunk.get("count", 0)), 0
    if chunk.get("entries") == ENTRIES_FILE:
        return int(chunk.get("count", 0)), int(chunk.get("failed", 0))
    values = chunk.get("values")
    entries = values if isinstance(values, list) else []
    return len(entries), sum(1 for e in entries if isinstance(e, dict) and "failed" in e)


def partly_failed(value: Any) -> bool:
    """Whether a commit record's value is a chunk's holding an item that failed: the cross-run
    cache does not reuse it, so that item runs again."""
    counts = chunk_counts(value)
    return counts is not None and counts[1] > 0


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
    loads = _loader(shard)
    return [loads(one) for one in pickles]


class UnpicklableValue(TypeError):
    """The function returned a value that cannot be pickled to go back to the caller."""


def pickled(value: Any) -> bytes:
    """A value's pickle: the standard pickler where it can (several times faster on small
    values), else cloudpickle (a lambda, a class shipped by value).

    Raises:
        UnpicklableValue: neither pickles it (says what it is and what to return instead).
    """
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        pass
    import cloudpickle

    try:
        return cloudpickle.dumps(value)
    except Exception as exc:
        raise UnpicklableValue(
            f"the function returned a {type(value).__name__}, which cannot be pickled to go"
            f" back: {type(exc).__name__}: {said(exc)}; return picklable values (no open files,"
            " locks or connections; a list, not a generator)"
            + _AWAIT_HINT.get(type(value).__name__, "")
        ) from None


_AWAIT_HINT = {  # what to do where the value is one an async function makes
    "coroutine": "; map the `async def` function itself (it is awaited), not one returning"
    " its coroutine",
    "async_generator": "; an `async def` with `yield` makes its values one at a time: return"
    " a list",
}
