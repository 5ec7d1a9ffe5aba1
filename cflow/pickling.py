"""How the function and its items are pickled for the workers.

The function goes by value with cloudpickle, and so do the caller's own modules that the workers
cannot import: those under the working folder or the folder of ``__main__``'s script that are
not installed (not under this interpreter's prefix). Its code keeps the name of the file it was
defined in (cloudpickle's own writes ``<dynamic-code>``), so that a worker's traceback names the
submitting script, whichever process reads it.

An item goes with the standard pickler (the fastest), classes by reference. A worker that is not
a fork of this process (a notebook's, Google Cloud's) has no class of ``__main__`` or of those
modules to find by its name: those an item names go by value beside it, once a chunk
(:meth:`ItemPickler.take`), and are the same classes to the worker as the function's.

With ``cache=True``, what the cross-run cache keys shards on is the same from any process
(:mod:`cflow.canonical`): the function's pickle without line numbers, and the items pickled in
the same bytes (sets in a fixed order).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import itertools
import pickle
import pickletools
import re
import sys
import threading
import types
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cloudpickle

from cflow.canonical import PROTOCOL, Canonical, canonical_dumps, code_key, holds_a_set
from cflow.inputs import files_named
from cflow.own import is_installed, own_modules
from worker.errors import ConfigError
from worker.pyfunc import CLASSES_KEY_PARAM, CLASSES_PARAM, DYNAMIC_CODE, FILES_PARAM
from worker.pyfunc.modules import INSTALLED  # on every worker: never shipped by value

NAMED_OPS = 10_000  # opcodes of a function's pickle read for the modules it names (~3 ms)


_register_lock = threading.Lock()  # cloudpickle's registry is global: one pickling at a time


@contextmanager
def _by_value(own: tuple[str, ...]) -> Iterator[None]:
    """cloudpickle ships the modules ``own`` names by value for as long as this lasts."""
    with _register_lock:
        registered = []
        try:
            for name in own:
                if name in sys.modules:
                    cloudpickle.register_pickle_by_value(sys.modules[name])
                    registered.append(name)
            yield
        finally:
            for name in registered:
                cloudpickle.unregister_pickle_by_value(sys.modules[name])


def _code_with_its_file(code: types.CodeType) -> Any:
    """cloudpickle's reduction of a code object, keeping the name of the file it was defined
    in where cloudpickle writes ``<dynamic-code>``."""
    make, args = _cloudpickle._code_reduce(code)
    at = next(i for i, arg in enumerate(args) if isinstance(arg, str) and arg == DYNAMIC_CODE)
    return make, (*args[:at], code.co_filename, *args[at + 1 :])


class _Shipping(cloudpickle.Pickler):
    """cloudpickle's pickler, each function's code keeping its file's name: a worker's
    traceback names the file of the process that pickled it (the submitting script, a module
    of its own; its source line added where the worker has no such file), not
    ``<dynamic-code>``, whichever process reads it (:mod:`cflow.errors`). The cache keys the
    function without it (:func:`cflow.canonical.code_key`)."""

    dispatch_table = ChainMap(
        {types.CodeType: _code_with_its_file}, cloudpickle.Pickler.dispatch_table
    )


def _shipped(obj: Any) -> bytes:
    """``obj`` pickled by value as cloudpickle does, its code naming its files
    (:class:`_Shipping`); within :func:`_by_value` for the caller's modules to go by value."""
    out = io.BytesIO()
    _Shipping(out, protocol=PROTOCOL).dump(obj)
    return out.getvalue()


def not_callable(fn: Any) -> str:
    """The line for a function to map that is not callable."""
    shown = repr(fn)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"the function to map is not callable: {shown} ({type(fn).__name__}); pass a function"


def pickle_function(fn: Any, own: tuple[str, ...] | None = None) -> bytes:
    """``fn`` pickled by value with the caller's modules that are not installed (``own``
    [default: :func:`own_modules`]).

    Raises:
        ConfigError: ``fn`` is not callable or cannot be pickled (says what holds it back).
    """
    if not callable(fn):
        raise ConfigError(not_callable(fn))
    with _by_value(own_modules() if own is None else own):
        try:
            return _shipped(fn)
        except Exception as exc:
            raise ConfigError(
                f"{getattr(fn, '__qualname__', fn)!s} cannot be shipped to the workers: "
                f"{type(exc).__name__}: {exc}; keep what it uses picklable (no open files,"
                " locks or connections), or make those inside the function"
            ) from None


def function_key(fn: Any, own: tuple[str, ...], runner: str) -> str:
    """What the cross-run cache keys ``fn`` on, run by the task file ``runner``: its pickle
    without line numbers, the same from any process (:func:`cflow.canonical.code_key`), with
    the caller's modules by value as it is shipped. Taken before ``fn`` is pickled to be
    shipped: the classes it ships are then tagged as the items' are.

    Raises:
        ConfigError: ``fn`` is not callable or cannot be pickled.
    """
    if not callable(fn):
        raise ConfigError(not_callable(fn))
    with _by_value(own):
        try:
            code = code_key(fn)
        except Exception as exc:
            failed = exc
        else:
            return hashlib.sha256(f"{runner}\0{code}".encode()).hexdigest()
    pickle_function(fn, own)  # what cannot be shipped is said as shipping says it
    raise ConfigError(
        f"{getattr(fn, '__qualname__', fn)!s} cannot be keyed for the cache:"
        f" {type(failed).__name__}: {failed}; map it without cache=True"
    )


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})


class ItemPickler:
    """Each item's pickle (see the module's doc).

    An item the standard pickler takes is pickled by it, classes and functions by reference;
    those of ``__main__`` and of the caller's own modules (``own``) that it names are kept
    aside, and :meth:`take` ships them by value, once for the items pickled since it was last
    called (a chunk's), for the worker to find them by (``worker.pyfunc.shared.load_items``).
    An item it does not take (a lambda, a class made in a function) goes by value whole. With
    ``canonical``, every pickle is the same bytes from any process (sets in a fixed order).
    One reading thread at a time.
    """

    def __init__(self, own: tuple[str, ...] = (), *, canonical: bool = False):
        self._own = own
        self._modules = frozenset(("__main__", *own))
        # What a pickle naming such a class holds: its module's name as the pickle spells it
        # (a string may hold one too: the item is then pickled again, to the same bytes).
        names = sorted(re.escape(n.encode()) for n in self._modules)
        self._names_any = re.compile(b"|".join(names)).search
        self._canonical = canonical
        self._files: set[str] = set()  # with the cache: the files the items name (take)
        self._named: dict[str, Any] = {}  # "module\0qualname" -> the class or function
        self._out = io.BytesIO()
        self._naming = _Naming(self._out, self._modules, self._named)
        # The last item named a class of the caller's own: the next (of a map over records)
        # likely does too, and is pickled once, keeping its classes aside, not twice.
        self._naming_last = False

    def dumps(self, index: int, item: Any) -> bytes:
        """Item ``index``'s pickle.

        Raises:
            ConfigError: it does not pickle (says which item, what it is and what to map over).
        """
        if self._canonical:
            self._files.update(files_named(item))
        try:
            if self._naming_last and not self._canonical:  # the last named some: as will this
                return self._named_pickle(item)
            data = pickle.dumps(item, protocol=PROTOCOL)
        except (pickle.PicklingError, TypeError, AttributeError):
            return self._whole(index, item)
        return self._checked(index, item, data)

    def _checked(self, index: int, item: Any, data: bytes) -> bytes:
        """Item ``index``'s pickle, ``data`` the standard pickler's: it, or made again where
        it names the caller's own classes or (with the cache) holds a set."""
        names = self._names_any(data) is not None
        if not names and not self._canonical:
            return data  # most items: nothing of the caller's own named
        if self._canonical and (names or holds_a_set(item, data)):
            out = io.BytesIO()
            _CanonicalNaming(out, self._modules, self._named).dump(item)
            return out.getvalue()
        if names:
            self._naming_last = True
            return self._named_pickle(item)
        return data

    def pickles(
        self, items: Iterable[Any], stopped: Callable[[], bool]
    ) -> Iterator[tuple[int, bytes]]:
        """``(index, pickle)`` of each item, as :meth:`dumps` makes them, until ``stopped``;
        the standard pickler's, where it does, with its names bound once (a map's thousands
        of small items go through here)."""
        dumps, protocol, search = pickle.dumps, PROTOCOL, self._names_any
        canonical, empty_set, frozen = self._canonical, pickle.EMPTY_SET, pickle.FROZENSET
        files = self._files
        for index, item in enumerate(items):
            if stopped():
                return
            if canonical:
                files.update(files_named(item))
            if type(item) in _SCALARS:  # names no class, holds no set: nothing to look for
                yield index, dumps(item, protocol=protocol)
                continue
            if canonical or not self._naming_last:
                try:
                    data = dumps(item, protocol=protocol)
                except (pickle.PicklingError, TypeError, AttributeError):
                    yield index, self._whole(index, item)
                    continue
                # With the cache, a pickle without a set's opcode among its bytes holds none.
                if search(data) is None and (
                    not canonical or (empty_set not in data and frozen not in data)
                ):
                    yield index, data
                    continue
                yield index, self._checked(index, item, data)  # not pickled a second time
                continue
            yield index, self.dumps(index, item)

    def _named_pickle(self, item: Any) -> bytes:
        """The standard pickle, the caller's own classes it names kept aside: one pickler
        for every such item, its memo cleared (a third faster than a pickler each)."""
        self._out.seek(0)
        self._out.truncate()
        self._naming.clear_memo()
        self._naming.dump(item)
        return self._out.getvalue()

    def take(self) -> dict[str, Any]:
        """The params that carry the classes and functions of the caller's own that the
        items pickled since the last call name: pickled by value (base64), and with
        ``canonical`` what the cache keys them on (their digest without line numbers, as
        the function's), and the files the items name (:mod:`cflow.inputs`); none where
        they name none."""
        params: dict[str, Any] = {}
        if self._files:
            params[FILES_PARAM] = sorted(self._files)
            self._files.clear()
        if not self._named:
            return params
        named = dict(sorted(self._named.items()))
        self._named.clear()  # the dict the picklers fill
        with _by_value(self._own):
            data = canonical_dumps(named) if self._canonical else _shipped(named)
            params[CLASSES_PARAM] = base64.b64encode(data).decode("ascii")
            if self._canonical:
                params[CLASSES_KEY_PARAM] = code_key(named)
        return params

    def _whole(self, index: int, item: Any) -> bytes:
        try:
            with _by_value(self._own):
                return canonical_dumps(item) if self._canonical else _shipped(item)
        except Exception as exc:
            raise ConfigError(
                f"item {index} (a {type(item).__name__}) cannot be shipped to the workers:"
                f" {type(exc).__name__}: {exc}; map over picklable items (no open files, locks"
                " or connections), or over what makes them (a path, say) and make them in the"
                " function"
            ) from None


def _name(obj: Any, modules: frozenset[str], named: dict[str, Any]) -> None:
    """Keep ``obj`` aside in ``named`` if it is a class or function of ``modules``."""
    if isinstance(obj, (type, types.FunctionType)):
        module = getattr(obj, "__module__", None) or ""
        if module.partition(".")[0] in modules or module in modules:
            named[f"{module}\0{obj.__qualname__}"] = obj


class _Naming(pickle.Pickler):
    """The standard pickler, keeping aside the classes and functions of ``modules`` it names."""

    def __init__(self, file: io.BytesIO, modules: frozenset[str], named: dict[str, Any]):
        super().__init__(file, protocol=PROTOCOL)
        self._modules, self._named = modules, named

    def reducer_override(self, obj: Any) -> Any:
        _name(obj, self._modules, self._named)
        return NotImplemented


class _CanonicalNaming(Canonical):
    """:class:`_Naming` in the same bytes from any process."""

    def __init__(self, file: io.BytesIO, modules: frozenset[str], named: dict[str, Any]):
        super().__init__(file)
        self._modules, self._named = modules, named

    def reducer_override(self, obj: Any) -> Any:
        _name(obj, self._modules, self._named)
        return NotImplemented  # by reference, as the standard pickler took it


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
            if file and is_installed(file):
                found.add(name)
    except ValueError:  # not a pickle this Python reads: nothing to name
        return ()
    return tuple(sorted(found))


def loads(data: bytes | memoryview) -> Any:
    """A value, item or exception come back from the workers, unpickled without touching the
    caller's own classes.

    cloudpickle unpickles a class it shipped by value as the class of this process with its
    tag, and then sets every attribute the pickle holds on it: the caller's class would have
    its methods replaced by copies whose globals were taken on the worker (a global changed
    here afterwards would not be seen by them), and its cache key would change."""
    if BY_VALUE not in data:  # no class by value in it: the standard unpickler
        return pickle.loads(data)
    return _Values(data).load()


BY_VALUE = b"_class_setstate"  # in every pickle of a class shipped by value
_SKELETON_TAG = {"_make_skeleton_class": 4, "_make_skeleton_enum": 5}  # where the tag is


class _Values(pickle.Unpickler):
    """Leaves a class found here under its tag as it is (see :func:`loads`)."""

    def __init__(self, data: bytes | memoryview):
        super().__init__(io.BytesIO(data))
        self._found: set[int] = set()  # ids of the classes that were here already

    def find_class(self, module: str, name: str) -> Any:
        if module == "cloudpickle.cloudpickle":
            if name in _SKELETON_TAG:
                return functools.partial(self._skeleton, getattr(_cloudpickle, name), name)
            if name == "_class_setstate":
                return self._setstate
        return super().find_class(module, name)

    def _skeleton(self, make: Callable[..., type], name: str, *args: Any) -> type:
        tag = args[_SKELETON_TAG[name]]
        here = tag is not None and tag in _cloudpickle._DYNAMIC_CLASS_TRACKER_BY_ID
        cls = make(*args)
        if here:
            self._found.add(id(cls))
        return cls

    def _setstate(self, cls: type, state: Any) -> type:
        if id(cls) in self._found:
            return cls
        return _cloudpickle._class_setstate(cls, state)
