"""The caller's own modules on a worker: those ``cflow`` ships by value (``cflow.pickling``:
every module not installed under the caller's prefix or a site-packages folder), named in the
task folder's :data:`OWN_FILE`.

A task host forked from a launcher that was forked from the caller holds the caller's own
modules as they were at that fork, and a module imported inside the function (``import
helper`` in its body) would be that old copy, not the file as it is now: :func:`forget` drops
them, so such an import reads the file afresh, as a new interpreter's would.

The function's classes and functions of those modules come by value, as objects that are not
their module's: ``pickle.dump`` of an instance inside the function ("it's not the same object
as hcls.P"), or a ``multiprocessing`` pool given one, failed. :func:`adopt` makes each the
attribute of its module here (imported afresh where it can be, else made empty), so pickling
by reference finds the very object.

Never imports the runner or cflow: it runs on every worker.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from pathlib import Path
from typing import Any

OWN_FILE = "own.txt"  # beside the function: the top-level names of the caller's own modules
INSTALLED = ("cflow", "runner", "worker", "infra")  # this project's: never the caller's own
TASK_MODULE = "task"  # the host's own task.py (worker.executors.zygote.load_task): never dropped
_DEPTH = 3  # how far from the function its globals and closures are followed


def own_names(function_file: Path) -> frozenset[str]:
    """The top-level names the task folder lists (none where it lists none)."""
    try:
        text = function_file.with_name(OWN_FILE).read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    names = (n for n in text.split() if n.partition(".")[0] not in INSTALLED)
    return frozenset(n for n in names if n != TASK_MODULE)


def forget(own: frozenset[str]) -> None:
    """Drop the modules of ``own`` this process holds (a fork's copies)."""
    for name in [m for m in sys.modules if m.partition(".")[0] in own]:
        del sys.modules[name]


def adopt(fn: Any, own: frozenset[str]) -> None:
    """Make each class and top-level function of ``own`` that ``fn`` reaches (its globals and
    closures, a few steps deep) the attribute of its module in this process."""
    seen: set[int] = set()
    for obj in _reached(fn, _DEPTH, seen):
        if isinstance(obj, types.ModuleType):  # a module shipped whole: it is that module
            if obj.__name__.partition(".")[0] in own:
                sys.modules[obj.__name__] = obj
            continue
        module_name = getattr(obj, "__module__", None)
        qualname = getattr(obj, "__qualname__", "")
        if not isinstance(module_name, str) or module_name.partition(".")[0] not in own:
            continue
        if "." in qualname or "<" in qualname:
            continue  # a method, or one made inside a function: no module attribute
        module = _module(module_name)
        with contextlib.suppress(AttributeError, TypeError):
            setattr(module, qualname, obj)


def _module(name: str) -> types.ModuleType:
    """The module ``name`` here: as imported now, else an empty one (a worker without it)."""
    found = sys.modules.get(name)
    if found is not None:
        return found
    try:
        return importlib.import_module(name)
    except Exception:  # not importable here (a VM without the caller's files)
        module = types.ModuleType(name)
        sys.modules[name] = module
        return module


def _reached(obj: Any, depth: int, seen: set[int]) -> list[Any]:
    """The functions and classes reachable from ``obj``, ``obj`` among them."""
    if id(obj) in seen or depth < 0:
        return []
    seen.add(id(obj))
    found: list[Any] = []
    if isinstance(obj, types.ModuleType):
        return [obj]  # not followed: a module is not reached through, only named
    if inspect.isclass(obj) or inspect.isfunction(obj):
        found.append(obj)
    inner = getattr(obj, "__func__", None) or getattr(obj, "func", None)  # method, partial
    nexts: list[Any] = [inner] if inner is not None else []
    if inspect.isfunction(obj):
        nexts += list(obj.__globals__.get(n) for n in obj.__code__.co_names)
        nexts += [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
    elif not inspect.isclass(obj):
        nexts.append(type(obj))  # a callable object: its class
    for value in nexts:
        if value is not None:
            found += _reached(value, depth - 1, seen)
    return found


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True
