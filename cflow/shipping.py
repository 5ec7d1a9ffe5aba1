"""Shipping a function and its items: the generated task folder and the shards of a stream.

The function and the items are pickled as :mod:`cflow.pickling` says. Each item becomes one
shard, or many small items one chunk shard (``cflow.chunks``): its pickle rides in the shard's
params when small (:data:`ITEM_INLINE_LIMIT`), else it is put in the store under the run and is
the shard's input file.
"""

from __future__ import annotations

import base64
import contextlib
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from pathlib import Path
from typing import Any

from cflow.chunks import Chunking, chunk_item, span
from cflow.pickling import ItemPickler, modules_named, pickle_function
from cflow.pickling import loads as load_value
from worker.protocol import Layout, Manifest, Shard
from worker.pyfunc import FOLDER_FILE, FUNCTION_FILE, ITEM_PARAM
from worker.pyfunc.modules import OWN_FILE
from worker.store import Store
from worker.tempdirs import temp_folder

ITEM_INLINE_LIMIT = 8 * 1024  # bytes of an item's pickle carried in its shard's params

TASK_PY = textwrap.dedent(
    '''\
    """Calls a Python function shipped by value (cflow.map / cflow.submit)."""

    from pathlib import Path

    from worker.pyfunc import call


    def run(shard):
        return call(shard, Path(__file__).with_name("function.pkl"))
    '''
)


def shard_id(index: int) -> str:
    """Item ``index``'s shard id: zero-padded, so the ids sort in input order."""
    return f"{index:07d}"


def make_task(
    fn: Any, own: tuple[str, ...] | None = None, folder: Path | None = None
) -> tuple[tempfile.TemporaryDirectory[str], tuple[str, ...]]:
    """A task folder that runs ``fn`` on each shard's item (removed with the object), and the
    installed modules its pickle names (:func:`cflow.pickling.modules_named`); ``own`` as
    :func:`cflow.pickling.pickle_function` takes it. ``folder``: where the items run (the
    caller's working folder, for a run on this machine), else in each attempt's own."""
    data = pickle_function(fn, own)
    made = temp_folder("fn")
    name = str(getattr(fn, "__name__", "fn"))  # the run's task name (`runner runs`)
    readable = "".join(c if c.isalnum() or c == "_" else "-" for c in name).strip("-")
    task = Path(made.name) / (readable or "fn")
    task.mkdir()
    (task / "task.py").write_text(TASK_PY, encoding="utf-8")
    (task / FUNCTION_FILE).write_bytes(data)
    if folder is not None:
        (task / FOLDER_FILE).write_text(str(folder), encoding="utf-8")
    if own:
        (task / OWN_FILE).write_text("\n".join(own) + "\n", encoding="utf-8")
    return made, modules_named(data)


def task_dir(folder: tempfile.TemporaryDirectory[str]) -> Path:
    return next(Path(folder.name).iterdir())


class ItemFeed:
    """The items as shards, read lazily (``runner.engine.stream.ShardFeed``)."""

    def __init__(
        self,
        items: Iterable[Any],
        chunking: Chunking | None = None,
        pickler: ItemPickler | None = None,
    ):
        self._items = items
        self._pickler = pickler or ItemPickler()
        self._chunking = chunking if chunking is not None and chunking.chunked else None
        self._total = len(items) if isinstance(items, Sized) else None
        self._spans: dict[str, tuple[int, int]] = {}  # chunk id -> (first item, count)
        self._lock = threading.Lock()  # the spans grow in the reading thread
        self._stop = threading.Event()
        self._cancel = False
        self._exhausted = False  # every item was read (the iterable ended, not the reading)
        self.error: BaseException | None = None  # what the iterable raised, if it did

    def stop(self, *, cancel: bool = False) -> None:
        """Read no more items: the run counts those published so far (and is recorded
        cancelled with them, with ``cancel``)."""
        self._cancel = self._cancel or cancel
        self._stop.set()

    def spans(self) -> dict[str, tuple[int, int]]:
        """Each chunk made so far: its first item and item count, by id."""
        with self._lock:
            return dict(self._spans)

    @property
    def chunked(self) -> bool:
        """Whether the items go in chunks (``cflow.chunks``), else one shard each."""
        return self._chunking is not None

    def stopped(self) -> bool:
        return self._stop.is_set()

    def leave(
        self,
        run_id: str,
        manifest: Callable[[], Manifest],
        pace: float,
        stop_seconds: float,
        *,
        read_all: bool,
    ) -> str:
        """Stop reading items for a run left going (``Run._leave_going``): with ``read_all``
        the rest are read first (Ctrl-C stops that), and the count of those read is recorded
        (``manifest()`` no longer publishing) within ``stop_seconds``. What the line leaving it
        adds: how many items it holds, where reading was cut short."""
        if read_all and manifest().publishing:
            print(
                f"cflow: reading the rest of run {run_id}'s items before leaving it going"
                " (Ctrl-C stops reading them)",
                file=sys.stderr,
            )
            with contextlib.suppress(KeyboardInterrupt):
                while manifest().publishing and not self.stopped():
                    time.sleep(pace)
        self.stop()
        deadline = time.monotonic() + stop_seconds
        while (current := manifest()).publishing and time.monotonic() < deadline:
            time.sleep(pace / 4)
        if self.error is not None or self.exhausted():
            return ""
        held = self.held(current.published or 0)
        return f" with its first {held} items (reading them stopped here)"

    def exhausted(self) -> bool:
        """Whether every item was read: the iterable ended, not the reading."""
        return self._exhausted

    def held(self, shards: int) -> int:
        """How many items the run's first ``shards`` shards hold."""
        if self._chunking is None or shards <= 0:
            return max(shards, 0)
        first, count = self.spans().get(shard_id(shards - 1), (0, 0))
        return first + count

    def at_least(self) -> int | None:
        if self._chunking is None:  # one shard per item
            return self._total
        return self._chunking.at_least()

    def cancels(self) -> bool:
        return self._cancel

    def in_memory(self) -> bool:
        # A list's, a tuple's or a range's items are there to be read; any other iterable
        # (a generator, a dataset reading files) may wait, and is read in a thread of its own.
        return type(self._items) in (list, tuple, range)

    def shards(self, store: Store, run_id: str) -> Iterator[Shard]:
        try:
            yield from self._shards(store, run_id)
            self._exhausted = not self._stop.is_set()
        except BaseException as exc:  # kept for the caller: the run ends with what was read
            self.error = exc
            raise

    def _shards(self, store: Store, run_id: str) -> Iterator[Shard]:
        if self._chunking is not None:
            pickled = self._pickled()
            for shard in self._chunking.shards(pickled, store, run_id, self._pickler.take):
                found = span(shard)
                if found is not None:
                    with self._lock:
                        self._spans[shard.id] = found
                yield shard
            return
        for index, item in enumerate(self._items):
            if self._stop.is_set():
                return
            data = self._pickler.dumps(index, item)
            sid = shard_id(index)
            params = self._pickler.take() or None
            if len(data) <= ITEM_INLINE_LIMIT:
                params = {**(params or {}), ITEM_PARAM: base64.b64encode(data).decode("ascii")}
                yield Shard(id=sid, index=index, params=params)
                continue
            key = f"{Layout.uploads(run_id)}{sid}.pkl"
            store.put(key, data)
            local = store.local_path(key)
            where = str(local) if local else store.url(key)
            yield Shard(id=sid, index=index, input=where, params=params)

    def _pickled(self) -> Iterator[tuple[int, bytes]]:
        return self._pickler.pickles(self._items, self._stop.is_set)


def item_of(shard: Shard, store: Store, run_id: str, j: int = 0) -> Any:
    """A shard's item (``j``: which of a chunk's), read back (from its params, or the store)."""
    if span(shard) is not None:
        return chunk_item(shard, j, store, run_id)
    if shard.params and ITEM_PARAM in shard.params:
        return load_value(base64.b64decode(shard.params[ITEM_PARAM]))
    return load_value(store.get(f"{Layout.uploads(run_id)}{shard.id}.pkl"))
