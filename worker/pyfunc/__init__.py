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
output of its own, ``value-<index>.pkl`` (the entries themselves in :data:`ENTRIES_FILE` when
too many for the record: a chunk of thousands of items); an item that raised is tried again at
once, up to its tries (each retry said in the log), and then kept as failed, its
:data:`ERROR_MARK` line naming it (``item``) and where its part of the log starts (``log_from``,
bytes), while the other items go on. What is not an ``Exception`` (``SystemExit``,
``KeyboardInterrupt``) fails the whole chunk's attempt, as a crash or a timeout does; the chunk
is then run again whole, its values having died with the attempt, and from its second attempt on
each item runs in a process of its own forked from the host (:mod:`worker.pyfunc.chunk`): an
item that crashes it (``os._exit``, a segfault, the OOM killer) then fails alone, after its
tries, and the chunk's other items keep their values, where before one such item failed every
item of its chunk.

What the parts share is in :mod:`worker.pyfunc.shared`; a chunk's items run in
:mod:`worker.pyfunc.chunk`. Never imports the runner or cflow: it runs on every worker.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from worker.pyfunc.chunk import ItemTimedOut, call_chunk
from worker.pyfunc.shared import (
    CHUNK_INLINE_BUDGET,
    CHUNK_PARAM,
    CHUNK_PICKLES,
    CLASSES_KEY_PARAM,
    CLASSES_PARAM,
    DYNAMIC_CODE,
    ENTRIES_FILE,
    ERROR_MARK,
    ERROR_PICKLE_LIMIT,
    FILES_PARAM,
    FOLDER_FILE,
    FUNCTION_FILE,
    INLINE_LIMIT,
    ITEM_PARAM,
    ITEMS_PARAM,
    OVERFLOW_FILE,
    VALUE_FILE,
    UnpicklableValue,
    chunk_counts,
    describe_error,
    enter_folder,
    keep_value,
    load_function,
    load_item,
    load_items,
    log,
    partly_failed,
)
from worker.taskapi import TaskShard

__all__ = [
    "CHUNK_INLINE_BUDGET",
    "CHUNK_PARAM",
    "CHUNK_PICKLES",
    "CLASSES_KEY_PARAM",
    "CLASSES_PARAM",
    "DYNAMIC_CODE",
    "ENTRIES_FILE",
    "ERROR_MARK",
    "ERROR_PICKLE_LIMIT",
    "FILES_PARAM",
    "FOLDER_FILE",
    "FUNCTION_FILE",
    "INLINE_LIMIT",
    "ITEMS_PARAM",
    "ITEM_PARAM",
    "OVERFLOW_FILE",
    "VALUE_FILE",
    "ItemTimedOut",
    "UnpicklableValue",
    "call",
    "call_chunk",
    "chunk_counts",
    "describe_error",
    "keep_value",
    "load_function",
    "load_item",
    "load_items",
    "partly_failed",
]


def call(shard: TaskShard, function_file: Path) -> dict[str, Any]:
    """Run the shipped function on the shard's item; what ``run(shard)`` returns.

    Raises:
        BaseException: whatever the function raised, after its :data:`ERROR_MARK` line.
    """
    fn = load_function(function_file)
    enter_folder(function_file)
    if CHUNK_PARAM in shard.params:
        return call_chunk(shard, fn)
    item = load_item(shard)
    try:
        return keep_value(shard, fn(item))
    except BaseException as exc:  # what it raised, or a value that will not pickle
        log(ERROR_MARK + json.dumps(describe_error(exc)) + "\n")
        sys.stderr.flush()
        raise
