"""A chunk shard's items run one after another in the task host (:mod:`worker.pyfunc`):
every item's outcome in one record, each item timed, and from a chunk's second attempt each
item in a process of its own.

Never imports the runner or cflow: it runs on every worker.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import pickle
import select
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.pyfunc.shared import (
    CHUNK_INLINE_BUDGET,
    CHUNK_PARAM,
    CHUNK_PICKLES,
    CHUNK_RECORD_LIMIT,
    COMPACT_BYTES,
    ENTRIES_FILE,
    ERROR_MARK,
    INLINE_LIMIT,
    OVERFLOW_FILE,
    PICKLED_ITEM_COST,
    describe_error,
    load_items,
    log,
    pickled,
    said,
)
from worker.taskapi import TaskShard


def _log_size(appends: bool) -> int:
    """Bytes in the attempt's log so far (0 where fd 2 is no file): where an item's part of
    the log starts. Called before every item of a chunk, so it is kept to a plain loop.
    ``appends``: fd 2 is a file opened to append (:func:`_appends`), whose size a seek to its
    end gives without a stat (its offset moves there at each write anyway)."""
    _flush_streams()
    try:
        return os.lseek(2, 0, os.SEEK_END) if appends else os.fstat(2).st_size
    except OSError:
        return 0


def _flush_streams() -> None:
    """What the function printed and Python still buffers, written out (before an item's log
    size is read, before a fork: nothing is written twice)."""
    for stream in (sys.stdout, sys.stderr):
        try:  # noqa: SIM105 - contextlib.suppress costs a microsecond an item here
            stream.flush()
        except Exception:  # closed or replaced by the function: its own business
            pass


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
    limit = float(spec["timeout"]) if spec.get("timeout") else None
    # From the chunk's second attempt (its first died whole: a crash, a timeout, a
    # preemption) each item runs in a process of its own, so one that crashes it fails alone.
    isolated = shard.attempt > 1 and hasattr(os, "fork")
    tries = max(int(spec.get("tries", 1)), 1)
    # An isolated item's process is killed at its timeout instead of being interrupted.
    watch = _Watch(None if isolated else limit)
    chunk = _Chunk(shard, tries, limit, _Overflow(shard.output_dir), watch)
    run = _run_isolated if isolated else _run_item
    first = int(spec["first"])
    # Each item starts in the folder the chunk started in (the caller's, locally): one that
    # changes folder (a library's os.chdir) does not move the items after it.
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for j, item in enumerate(load_items(shard)):
            if j:
                os.fchdir(here)
            run(fn, item, first + j, chunk)
    finally:
        os.close(here)
        chunk.watch.close()
        chunk.overflow.close()
    record = chunk.record(first)
    if chunk.pending is not None or chunk.entries_size() <= CHUNK_RECORD_LIMIT:
        return record  # one list (its room was kept), or entries that fit, without a dump
    # Too many items for the record (each entry takes some 40 bytes): they go to a file.
    Path(shard.output_dir, ENTRIES_FILE).write_text(json.dumps(chunk.kept), encoding="utf-8")
    failed = sum(1 for entry in chunk.kept if "failed" in entry)
    return {
        "chunk": {
            "first": first,
            "count": len(chunk.kept),
            "failed": failed,
            "entries": ENTRIES_FILE,
        }
    }


class ItemTimedOut(BaseException):
    """An item ran past its timeout, raised in it by ``SIGALRM`` (not an ``Exception``: a
    function's ``except Exception`` does not swallow it); it fails the item's try."""


class _Watch:
    """Times each item of a chunk run in this process (``limit`` seconds each; None: none is
    timed): one alarm, set again only when it rings early, raises :class:`ItemTimedOut` in
    the item that has run for ``limit`` seconds. No system call an item: a chunk of a
    thousand quick items costs what it did untimed."""

    def __init__(self, limit: float | None):
        self.limit = limit
        self.began: float | None = None  # when the item running now began (None: none runs)
        self.on = limit is not None and threading.current_thread() is threading.main_thread()
        if limit is not None and self.on:
            self.before = signal.signal(signal.SIGALRM, self._ring)
            signal.setitimer(signal.ITIMER_REAL, limit)

    def start(self) -> None:
        self.began = time.monotonic()

    def stop(self) -> None:
        self.began = None

    def _ring(self, signum: int, frame: Any) -> None:
        assert self.limit is not None
        # Rung between two items (in this chunk's own work): nothing is raised, it rings again.
        ran = 0.0 if self.began is None else time.monotonic() - self.began
        if ran >= self.limit:
            signal.setitimer(signal.ITIMER_REAL, self.limit)  # for the items after this one
            raise ItemTimedOut(f"it ran past its timeout of {self.limit:g} s")
        # Never 0, which would disarm it (the timer counts whole microseconds).
        signal.setitimer(signal.ITIMER_REAL, max(self.limit - ran, 0.001))

    def close(self) -> None:
        if self.on:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.before)


@dataclass
class _Chunk:
    """What running a chunk's items keeps: their entries and the record's room left.

    While every item so far succeeded with a small value, their pickles are only held
    (``pending``): a chunk whose items all did, and whose values fit the record, keeps them as
    one pickled list (:data:`CHUNK_PICKLES`), a fraction of the time an entry an item takes
    (base64 and a dict each, written and read back as JSON). The first failure, large value or
    value past the room turns what is held into entries, and the chunk goes on with entries."""

    shard: TaskShard
    tries: int
    limit: float | None
    overflow: _Overflow
    watch: _Watch
    appends: bool = field(default_factory=_appends)
    kept: list[dict[str, Any]] = field(default_factory=list)
    budget: int = CHUNK_INLINE_BUDGET
    pending: list[tuple[int, bytes]] | None = field(default_factory=list)
    held: int = 0  # bytes the pending pickles take in the one list

    def value(self, index: int, data: bytes) -> None:
        if self.pending is not None:
            size = len(data) + PICKLED_ITEM_COST
            if len(data) <= INLINE_LIMIT and self.held + size <= COMPACT_BYTES:
                self.pending.append((index, data))
                self.held += size
                return
            self._entries()
        entry = _kept(self.shard, index, data, self.budget, self.overflow)
        self.kept.append(entry)
        self.budget -= len(entry.get("pickle", ""))

    def failed(self, record: dict[str, Any], index: int, start: int) -> None:
        log(ERROR_MARK + json.dumps(record | {"item": index, "log_from": start}) + "\n")
        self._entries()
        self.kept.append({"failed": self.tries})

    def _entries(self) -> None:
        """What is held, as entries from now on."""
        pending, self.pending = self.pending or [], None
        for index, data in pending:
            self.value(index, data)

    def entries_size(self) -> int:
        """Bytes of JSON the entries' record takes: 0 where a bound says it fits for sure
        (each entry the base64 it holds inline and at most 64 more: a file entry,
        ``{"file": "values.pkl", "at": ..., "size": ...}``, is under), else counted."""
        if len(self.kept) * 64 + (CHUNK_INLINE_BUDGET - self.budget) <= CHUNK_RECORD_LIMIT:
            return 0
        return len(json.dumps({"chunk": {"first": 0, "values": self.kept}}))

    def record(self, first: int) -> dict[str, Any]:
        """The chunk's record: its values in one pickled list, or an entry an item."""
        if self.pending is None:
            return {"chunk": {"first": first, "values": self.kept}}
        pickles = pickle.dumps([data for _, data in self.pending], protocol=pickle.HIGHEST_PROTOCOL)
        text = base64.b64encode(pickles).decode("ascii")
        return {"chunk": {"first": first, "count": len(self.pending), CHUNK_PICKLES: text}}


def _run_item(fn: Any, item: Any, index: int, chunk: _Chunk) -> None:
    """Run one item of a chunk, up to its tries, and keep its entry."""
    start = _log_size(chunk.appends)
    for attempt in range(1, chunk.tries + 1):
        try:
            chunk.watch.start()
            try:
                value = fn(item)
            finally:
                chunk.watch.stop()
            data = pickled(value)  # may not pickle: fails its item like a raise
        except (Exception, ItemTimedOut) as exc:
            if attempt < chunk.tries:
                log(
                    f"cflow: item {index} raised {type(exc).__name__}: {said(exc)}; try"
                    f" {attempt} of {chunk.tries}, running it again\n"
                )
                continue
            chunk.failed(describe_error(exc), index, start)
            return
        except BaseException as exc:
            record = describe_error(exc) | {"item": index, "log_from": start}
            log(ERROR_MARK + json.dumps(record) + "\n")
            raise
        chunk.value(index, data)
        return


def _run_isolated(fn: Any, item: Any, index: int, chunk: _Chunk) -> None:
    """:func:`_run_item`, each try in a child process forked for it: one that ends without
    its outcome (``os._exit``, a signal: a segfault, the OOM killer) or runs past the item's
    timeout (it is killed) fails this item's try, and what the item raises, ``SystemExit``
    included, fails this item only."""
    start = _log_size(chunk.appends)
    for attempt in range(1, chunk.tries + 1):
        kind, outcome = _in_child(fn, item, chunk.limit)
        if kind == "value":
            chunk.value(index, outcome)
            return
        said = outcome["message"] if kind == "crashed" else f"raised {outcome['type']}"
        if attempt < chunk.tries:
            log(f"cflow: item {index} {said}; try {attempt} of {chunk.tries}, running it again\n")
            continue
        chunk.failed(outcome, index, start)
        return


def _in_child(fn: Any, item: Any, limit: float | None) -> tuple[str, Any]:
    """``fn(item)`` in a child process forked now: ``("value", its pickle)``, ``("raised",
    the error record)``, or ``("crashed", a record saying how the child ended)``; a child
    still running after ``limit`` seconds is killed."""
    _flush_streams()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the item's own process
        os.close(read)
        try:
            try:
                data = b"V" + pickled(fn(item))
            except BaseException as exc:  # this item's failure, whatever it is
                data = b"E" + json.dumps(describe_error(exc)).encode()
            with os.fdopen(write, "wb") as out:
                out.write(data)
            _flush_streams()
        finally:
            os._exit(0)
    os.close(write)
    data, late = _read_until(read, None if limit is None else time.monotonic() + limit)
    if late:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if not late and data[:1] == b"V":
        return "value", data[1:]
    if not late and data[:1] == b"E":
        return "raised", json.loads(data[1:])
    if late:
        kind, how = "ItemTimedOut", f"it ran past its timeout of {limit:g} s and was killed"
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
        oom = " (the OOM killer, say)" if sig == signal.SIGKILL else ""
        kind, how = "ItemCrashed", f"the process running it was killed by {name}{oom}"
    else:
        code = os.WEXITSTATUS(status)
        kind, how = "ItemCrashed", f"the process running it exited with code {code}"
    return "crashed", {"type": kind, "message": how, "traceback": "", "pickle": None}


def _read_until(fd: int, deadline: float | None) -> tuple[bytes, bool]:
    """All ``fd`` gives until its end, or until ``deadline`` (then True: it came late)."""
    parts: list[bytes] = []
    with os.fdopen(fd, "rb", buffering=0) as got:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([got], [], [], left)[0]:
                    return b"".join(parts), True
            part = got.read(1 << 20)
            if not part:
                return b"".join(parts), False
            parts.append(part)


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


def _kept(
    shard: TaskShard, index: int, data: bytes, budget: int, overflow: _Overflow
) -> dict[str, Any]:
    """Item ``index``'s value (``data``, its pickle) as its chunk's record keeps it: inline
    while the record has room (``budget``), else in the chunk's :data:`OVERFLOW_FILE`, and one
    over :data:`INLINE_LIMIT` in an output of its own, ``value-<index>.pkl`` (read when it is
    asked for, when over 1 MB)."""
    text = base64.b64encode(data).decode("ascii")
    if len(data) > INLINE_LIMIT:
        name = f"value-{index}.pkl"
        Path(shard.output_dir, name).write_bytes(data)
        return {"file": name, "size": len(data)}
    if len(text) <= budget:
        return {"pickle": text}
    return overflow.add(data)
