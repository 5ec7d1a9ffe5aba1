"""Shipping a function and its items: the generated task folder and the shards of a stream.

The function is pickled by value with cloudpickle, and so are the caller's own modules that the
workers cannot import: those under the working folder or the folder of ``__main__``'s script
that are not installed (not under this interpreter's prefix). Each item becomes one shard, or
many small items one chunk shard (``cflow.chunks``): its pickle rides in the shard's params when
small (:data:`ITEM_INLINE_LIMIT`), else it is put in the store under the run and is the shard's
input file.
"""

from __future__ import annotations

import base64
import functools
import itertools
import os
import pickle
import pickletools
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from cflow.chunks import Chunking, chunk_item, span
from worker.errors import ConfigError
from worker.protocol import Layout, Shard
from worker.pyfunc import FUNCTION_FILE, ITEM_PARAM
from worker.store import Store

ITEM_INLINE_LIMIT = 8 * 1024  # bytes of an item's pickle carried in its shard's params
NAMED_OPS = 10_000  # opcodes of a function's pickle read for the modules it names (~3 ms)
INSTALLED = ("cflow", "runner", "worker", "infra")  # on every worker: never shipped by value

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


def _roots() -> list[str]:
    roots = [os.path.realpath(os.getcwd())]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        roots.append(os.path.dirname(os.path.realpath(main_file)))
    return roots


# A module's file -> its real path, and whether that is under this interpreter's prefix (an
# installed module, never shipped): a module's file does not move while a process runs, and a
# notebook maps many times over a thousand modules or more (a realpath per module of
# sys.modules on every map took 0.2 s; the prefix test alone a millisecond).
_real: dict[str, str] = {}
_installed: dict[str, bool] = {}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@functools.cache
def _prefixes() -> tuple[str, ...]:
    return tuple({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def _is_installed(file: str) -> bool:
    """Whether a module's ``file`` is under this interpreter's prefix (kept per file)."""
    installed = _installed.get(file)
    if installed is None:
        path = _real[file] = os.path.realpath(file)
        installed = _installed[file] = any(_under(path, p) for p in _prefixes())
    return installed


def _not_installed(module: ModuleType, roots: list[str]) -> bool:
    """A module of the caller's own: under ``roots`` and not under this interpreter's prefix."""
    name = module.__name__
    if name == "__main__" or name.partition(".")[0] in INSTALLED:
        return False
    file = getattr(module, "__file__", None)
    if not file:
        return False
    if _is_installed(file):
        return False
    return any(_under(_real[file], r) for r in roots)


_register_lock = threading.Lock()


def pickle_function(fn: Any) -> bytes:
    """``fn`` pickled by value with the caller's modules that are not installed.

    Raises:
        ConfigError: ``fn`` is not callable or cannot be pickled (says what holds it back).
    """
    if not callable(fn):
        raise ConfigError(f"the function to map is a {type(fn).__name__}, not a callable")
    roots = _roots()
    with _register_lock:  # the registry is cloudpickle's global: one pickling at a time
        own = {
            name.partition(".")[0]
            for name, module in list(sys.modules.items())
            # An installed module known as such is passed over without a call.
            if not _installed.get(getattr(module, "__file__", None) or "", False)
            and module is not None
            and _not_installed(module, roots)
        }
        registered = []
        for name in sorted(own):
            if name in sys.modules:
                cloudpickle.register_pickle_by_value(sys.modules[name])
                registered.append(name)
        try:
            return cloudpickle.dumps(fn)
        except Exception as exc:
            raise ConfigError(
                f"{getattr(fn, '__qualname__', fn)!s} cannot be shipped to the workers: "
                f"{type(exc).__name__}: {exc}; keep what it uses picklable (no open files,"
                " locks or connections), or make those inside the function"
            ) from None
        finally:
            for name in registered:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])


def modules_named(data: bytes) -> tuple[str, ...]:
    """The installed modules (not this project's) that ``data``, a pickled function, names in
    its first :data:`NAMED_OPS` opcodes: those a task host unpickling it imports (``numpy``
    for a function using ``np``, a model's class's module for a model it holds), so that a
    host forked ahead can import them before its task comes."""
    found: set[str] = set()
    try:
        for _, arg, _ in itertools.islice(pickletools.genops(data), NAMED_OPS):
            if not isinstance(arg, str):
                continue
            name = arg.partition(" ")[0]  # GLOBAL's argument is "module name"
            module = sys.modules.get(name)
            if module is None or name == "__main__" or name.partition(".")[0] in INSTALLED:
                continue
            file = getattr(module, "__file__", None)
            if file and _is_installed(file):
                found.add(name)
    except ValueError:  # not a pickle this Python reads: nothing to name
        return ()
    return tuple(sorted(found))


def make_task(fn: Any) -> tuple[tempfile.TemporaryDirectory[str], tuple[str, ...]]:
    """A task folder that runs ``fn`` on each shard's item (removed with the object), and the
    installed modules its pickle names (:func:`modules_named`)."""
    data = pickle_function(fn)
    folder = tempfile.TemporaryDirectory(prefix="cflow-fn-")
    name = str(getattr(fn, "__name__", "fn"))  # the run's task name (`runner runs`)
    readable = "".join(c if c.isalnum() or c == "_" else "-" for c in name).strip("-")
    task = Path(folder.name) / (readable or "fn")
    task.mkdir()
    (task / "task.py").write_text(TASK_PY, encoding="utf-8")
    (task / FUNCTION_FILE).write_bytes(data)
    return folder, modules_named(data)


def task_dir(folder: tempfile.TemporaryDirectory[str]) -> Path:
    return next(Path(folder.name).iterdir())


class ItemFeed:
    """The items as shards, read lazily (``runner.engine.stream.ShardFeed``)."""

    def __init__(self, items: Iterable[Any], chunking: Chunking | None = None):
        self._items = items
        self._chunking = chunking if chunking is not None and chunking.chunked else None
        self._total = len(items) if isinstance(items, Sized) else None
        self._spans: dict[str, tuple[int, int]] = {}  # chunk id -> (first item, count)
        self._lock = threading.Lock()  # the spans grow in the reading thread
        self._stop = threading.Event()
        self._cancel = False
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
        except BaseException as exc:  # kept for the caller: the run ends with what was read
            self.error = exc
            raise

    def _shards(self, store: Store, run_id: str) -> Iterator[Shard]:
        if self._chunking is not None:
            for shard in self._chunking.shards(self._pickled(), store, run_id):
                found = span(shard)
                if found is not None:
                    with self._lock:
                        self._spans[shard.id] = found
                yield shard
            return
        for index, item in enumerate(self._items):
            if self._stop.is_set():
                return
            data = _dumps(index, item)
            sid = shard_id(index)
            if len(data) <= ITEM_INLINE_LIMIT:
                params = {ITEM_PARAM: base64.b64encode(data).decode("ascii")}
                yield Shard(id=sid, index=index, params=params)
                continue
            key = f"{Layout.uploads(run_id)}{sid}.pkl"
            store.put(key, data)
            local = store.local_path(key)
            yield Shard(id=sid, index=index, input=str(local) if local else store.url(key))

    def _pickled(self) -> Iterator[tuple[int, bytes]]:
        # _dumps inlined, its names bound once: a few thousand items a map go through here.
        dumps, protocol, stopped = pickle.dumps, pickle.HIGHEST_PROTOCOL, self._stop.is_set
        for index, item in enumerate(self._items):
            if stopped():
                return
            try:
                data = dumps(item, protocol=protocol)
            except (pickle.PicklingError, TypeError, AttributeError):
                data = _dumps(index, item)  # a lambda, a class of __main__
            yield index, data


def _dumps(index: int, item: Any) -> bytes:
    """Item ``index``'s pickle: the standard pickler's where it can (faster), else
    cloudpickle's (a lambda, a class of ``__main__``).

    Raises:
        ConfigError: neither pickles it (says which item, what it is and what to map over).
    """
    try:
        return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError):
        pass
    try:
        return cloudpickle.dumps(item)
    except Exception as exc:
        raise ConfigError(
            f"item {index} (a {type(item).__name__}) cannot be shipped to the workers:"
            f" {type(exc).__name__}: {exc}; map over picklable items (no open files, locks or"
            " connections), or over what makes them (a path, say) and make them in the function"
        ) from None


def item_of(shard: Shard, store: Store, run_id: str, j: int = 0) -> Any:
    """A shard's item (``j``: which of a chunk's), read back (from its params, or the store)."""
    if span(shard) is not None:
        return chunk_item(shard, j, store, run_id)
    if shard.params and ITEM_PARAM in shard.params:
        return pickle.loads(base64.b64decode(shard.params[ITEM_PARAM]))
    return pickle.loads(store.get(f"{Layout.uploads(run_id)}{shard.id}.pkl"))
