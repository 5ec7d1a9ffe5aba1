"""How the shipped function is called on each item: as it is; an ``async def`` function's
coroutine awaited (:class:`Awaited`); the elements of an item of several iterables as its
arguments (:class:`Starred`, ``cflow.map(fn, xs, ys)`` as the built-in ``map``).

Never imports the runner or cflow: it runs on every worker (and :class:`Starred` is pickled by
reference to it).
"""

from __future__ import annotations

import inspect
import os
from typing import Any


class Starred:
    """``fn(*item)``: a map over several iterables calls ``fn`` with one element of each."""

    def __init__(self, fn: Any):
        self.fn = fn
        self.__name__ = str(getattr(fn, "__name__", "fn"))  # the run's task name

    def __call__(self, args: tuple[Any, ...]) -> Any:
        return self.fn(*args)


class Awaited:
    """An ``async def`` function called as a plain one: each call's coroutine is run to its end
    on this process's event loop, one call after another. A call that ends other than by its
    coroutine's return or raise (its item's timeout, say) leaves a task behind: the loop is
    closed and the next call gets a new one, as does a process forked since."""

    def __init__(self, fn: Any):
        self.fn = fn
        self._runner: Any = None
        self._pid = 0

    def __call__(self, *args: Any) -> Any:
        import asyncio

        runner, self._runner = self._runner, None
        if runner is None or self._pid != os.getpid():
            runner, self._pid = asyncio.Runner(), os.getpid()
        try:
            value = runner.run(self.fn(*args))
        except BaseException:
            if not runner.get_loop().is_running():
                runner.close()
            raise
        self._runner = runner
        return value


def callable_as_shipped(fn: Any) -> Any:
    """What calls ``fn`` (as unpickled) on one item: an ``async def`` function awaited."""
    if isinstance(fn, Starred):
        return Starred(callable_as_shipped(fn.fn))
    return Awaited(fn) if _is_async(fn) else fn


def _is_async(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine: an ``async def`` function, method or partial
    of one, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the method itself, not whether it exists
    )
