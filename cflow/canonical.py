"""Pickles that are the same bytes from every process, for the cross-run cache.

The cache keys a shard on the function's pickle without line numbers (:func:`code_key`) and on
its items' pickles (``runner.engine.cache``). cloudpickle's are not the same from one process to
the next: a class it ships by value is tagged with a random id, and a set of strings comes out
in the order of that process's string hashes. :class:`Canonical` pickles as cloudpickle does,
with a set's items in a fixed order and each class shipped by value tagged with the digest of
its own content: two classes of the same content are then one class to the workers, as one
class is to cloudpickle within a process, and a value coming back is an instance of the
caller's class.

It is the standard library's pickler written in Python, with cloudpickle's reducers: several
times slower than cloudpickle's, so only maps with ``cache=True`` use it (``cflow.pickling``),
and only where cloudpickle's bytes would differ (:func:`code_key`, :func:`holds_a_set`).
What it cannot order is what a value made of a set's order holds: a string made from a set (a
dataclass's generated docstring shows a default's ``repr``) differs from process to process.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import types
from collections import ChainMap
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import cloudpickle
from cloudpickle import cloudpickle as _cloudpickle

PROTOCOL = pickle.HIGHEST_PROTOCOL

if TYPE_CHECKING:

    class _PythonPickler(pickle.Pickler):
        """What the standard library's Python pickler has that its stubs do not say."""

        dispatch: ClassVar[dict[type, Callable[[Any, Any], None]]]
        memo: Any  # a dict of id -> (index, object), where the stubs say a proxy
        _BATCHSIZE: ClassVar[int]

        def write(self, data: bytes) -> None: ...
        def memoize(self, obj: Any) -> None: ...
        def save(self, obj: Any) -> None: ...
        def get(self, index: int) -> bytes: ...

else:
    _PythonPickler = pickle._Pickler


_SET_OPS = (pickle.EMPTY_SET, pickle.FROZENSET)


def holds_a_set(item: Any, data: bytes) -> bool:
    """Whether ``item``, whose standard pickle is ``data``, holds a set: none where none of a
    set's opcodes is among the bytes; else the item is pickled again, each object it holds
    looked at (a fifth of the time reading the opcodes took: 10 ms for 100,000 floats)."""
    if not any(op in data for op in _SET_OPS):
        return False
    finder = _SetFinder(io.BytesIO(), PROTOCOL)
    finder.dump(item)
    return finder.sets


class _NotingSets:
    """A pickler's mixin: ``sets`` says whether it met a set (asked of every object)."""

    sets = False

    def persistent_id(self, obj: Any) -> None:
        if type(obj) in (set, frozenset):
            self.sets = True


class _SetFinder(_NotingSets, pickle.Pickler):
    pass


def _code_without_lines(code: types.CodeType) -> Any:
    return _cloudpickle._code_reduce(code.replace(co_firstlineno=1, co_linetable=b""))


def content_tag(cls: type) -> str:
    """The tag of a class shipped by value: the digest of its content. cloudpickle tags the
    class so from now on in this process (its own tag is random), and a value of it coming
    back from a worker is unpickled as this class; the latest class of this content wins."""
    out = io.BytesIO()
    Canonical(out, labels=True).dump(cls)
    tag = hashlib.sha256(out.getvalue()).hexdigest()[:32]
    with _cloudpickle._DYNAMIC_CLASS_TRACKER_LOCK:
        _cloudpickle._DYNAMIC_CLASS_TRACKER_BY_ID[tag] = cls
        _cloudpickle._DYNAMIC_CLASS_TRACKER_BY_CLASS[cls] = tag
    return tag


def code_key(obj: Any) -> str:
    """What the cache keys a function (or the classes shipped with items) on: the digest of
    its pickle without line numbers (a line added above the function, in its script or its
    cell, changes none of what it computes), the same from any process.

    cloudpickle's own pickle is taken first (fast): where it ships no class by value and
    holds no set, its bytes are the same from any process. Else the canonical pickle is, each
    class named (its content is in the pickle). Every class shipped by value is tagged with
    its content (:func:`content_tag`), so that the function as shipped and the items' classes
    (:meth:`cflow.pickling.ItemPickler.take`) are one class to the workers."""
    out = io.BytesIO()
    fast = _KeyPickler(out)
    fast.dump(obj)
    for cls in fast.classes:
        content_tag(cls)
    if fast.classes or fast.sets:
        out = io.BytesIO()
        Canonical(out, labels=True, positions=False).dump(obj)
    return hashlib.sha256(out.getvalue()).hexdigest()


class _KeyPickler(_NotingSets, cloudpickle.Pickler):
    """cloudpickle's pickler, code without its line numbers, noting the classes it ships by
    value and whether it met a set (what makes its bytes differ between processes)."""

    dispatch_table = ChainMap(
        {types.CodeType: _code_without_lines}, cloudpickle.Pickler.dispatch_table
    )

    def __init__(self, file: io.BytesIO):
        super().__init__(file, protocol=PROTOCOL)
        self.classes: list[type] = []

    def reducer_override(self, obj: Any) -> Any:
        reduced = super().reducer_override(obj)
        if isinstance(obj, type) and reduced is not NotImplemented and reduced[0] in _SKELETONS:
            self.classes.append(obj)
        return reduced


def canonical_dumps(obj: Any) -> bytes:
    """``obj`` pickled as cloudpickle would, in bytes that do not depend on the process."""
    out = io.BytesIO()
    Canonical(out).dump(obj)
    return out.getvalue()


_SKELETONS = (_cloudpickle._make_skeleton_class, _cloudpickle._make_skeleton_enum)
_CACHED = frozenset({"__slotnames__"})  # what copyreg adds to a class when it pickles one
_ORDERED = (str, bytes, int, float)  # a set of one of these sorts by value; others by pickle


class Canonical(_PythonPickler):
    """cloudpickle's pickling in the standard library's Python pickler, whose every save can be
    steered: a set's items in a fixed order, a class shipped by value tagged with the digest
    of its content. ``labels``: tagged with its name instead (the pickle taken for a class's
    digest, which holds the content of every class it names). ``positions=False``: the code
    without its line numbers (:func:`code_key`)."""

    dispatch = _PythonPickler.dispatch.copy()
    dispatch_table = cloudpickle.Pickler.dispatch_table
    _function_reduce = cloudpickle.Pickler._function_reduce
    _dynamic_function_reduce = cloudpickle.Pickler._dynamic_function_reduce
    _function_getnewargs = cloudpickle.Pickler._function_getnewargs

    def __init__(self, file: io.BytesIO, *, labels: bool = False, positions: bool = True):
        super().__init__(file, protocol=PROTOCOL)
        self.globals_ref: dict[int, dict[str, Any]] = {}  # as cloudpickle's Pickler keeps
        self._labels = labels
        if not positions:
            self.dispatch_table = ChainMap(
                {types.CodeType: _code_without_lines}, Canonical.dispatch_table
            )

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, type):
            return self._class_reduce(obj)
        if isinstance(obj, types.FunctionType):
            return self._function_reduce(obj)
        return NotImplemented

    def _class_reduce(self, cls: type) -> Any:
        reduced = _cloudpickle._class_reduce(cls)
        if reduced is NotImplemented or reduced[0] not in _SKELETONS:
            return reduced  # by reference, or a builtin type
        random_id = _cloudpickle._get_or_create_tracker_id(cls)
        tag = self._tag(cls)
        args = tuple(tag if a is random_id else a for a in reduced[1])
        state = reduced[2]
        if isinstance(state, tuple) and isinstance(state[0], dict):
            # What copyreg caches in a class once one of its instances is pickled: there or
            # not depending on what this process did before, never part of the class's code.
            state = ({k: v for k, v in state[0].items() if k not in _CACHED}, *state[1:])
        return (reduced[0], args, state, *reduced[3:])

    def _tag(self, cls: type) -> str:
        if self._labels:
            return f"{cls.__module__}.{cls.__qualname__}"
        return content_tag(cls)

    def dump(self, obj: Any) -> None:
        try:
            super().dump(obj)
        except RecursionError as exc:
            raise pickle.PicklingError("too deeply nested to pickle") from exc

    def _sorted(self, items: Any) -> list[Any]:
        kinds = {type(x) for x in items}
        if len(kinds) == 1 and kinds <= set(_ORDERED):
            return sorted(items)
        return sorted(items, key=canonical_dumps)

    def save_set(self, obj: set[Any] | frozenset[Any]) -> None:
        self.write(pickle.EMPTY_SET)
        self.memoize(obj)
        ordered = self._sorted(obj)
        for start in range(0, len(ordered), self._BATCHSIZE):
            self.write(pickle.MARK)
            for item in ordered[start : start + self._BATCHSIZE]:
                self.save(item)
            self.write(pickle.ADDITEMS)

    def save_frozenset(self, obj: frozenset[Any]) -> None:
        self.write(pickle.MARK)
        for item in self._sorted(obj):
            self.save(item)
        if id(obj) in self.memo:  # it holds itself: what was put is thrown away
            self.write(pickle.POP_MARK + self.get(self.memo[id(obj)][0]))
            return
        self.write(pickle.FROZENSET)
        self.memoize(obj)

    dispatch[set] = save_set
    dispatch[frozenset] = save_frozenset
