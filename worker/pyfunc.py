"""Calling a Python function shipped by value: the runtime of the tasks ``cflow`` generates.

A ``cflow.map`` or ``cflow.submit`` task folder holds :data:`FUNCTION_FILE` (the function,
pickled with cloudpickle, the modules it needs that the worker lacks inside it) and a ``task.py``
whose ``run(shard)`` calls :func:`call`. Each shard carries one item: pickled into its params
(:data:`ITEM_PARAM`, base64) when small, or as its input file when large. The return value is
pickled; a small one rides in the shard's ``result.json`` (:data:`INLINE_LIMIT`), a larger one is
the shard's output :data:`VALUE_FILE`. A failure leaves one :data:`ERROR_MARK` line in the
attempt's log (the exception's type, message, full traceback and, where it pickles, the exception
itself) before it is raised again, so the attempt fails as any task's does.

Never imports the runner or cflow: it runs on every worker.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
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
    return tb.tb_next if tb is not None and tb.tb_frame.f_code is call.__code__ else tb


def call(shard: TaskShard, function_file: Path) -> dict[str, Any]:
    """Run the shipped function on the shard's item; what ``run(shard)`` returns.

    Raises:
        BaseException: whatever the function raised, after its :data:`ERROR_MARK` line.
    """
    fn = load_function(function_file)
    item = load_item(shard)
    try:
        value = fn(item)
    except BaseException as exc:
        line = ERROR_MARK + json.dumps(describe_error(exc)) + "\n"
        os.write(2, line.encode("utf-8", "backslashreplace"))  # fd 2: the attempt's log
        sys.stderr.flush()
        raise
    return keep_value(shard, value)
