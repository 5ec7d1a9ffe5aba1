"""The warm task host: one Python process per worker slot that runs shard after shard.

``python -m worker.executors.host TASK_DIR`` imports ``task.py`` once (so a model loaded at module
level is loaded once per process, not per shard), then serves requests one at a time on
stdin/stdout, one
JSON object per line:

  request  {"id": N, "log": PATH, "cwd": PATH, "env": {...}}
  replies  {"ready": true} | {"ready": false, "error": "..."} once at start,
           {"id": N, "exit": CODE, "reason": "...", "recycle": BOOL} when the shard ended.

For each shard the host points file descriptors 1 and 2 at the attempt's log, gives the task
fresh ``sys.stdout``/``sys.stderr`` objects (a task may close or replace them; the next shard
gets new ones), sets the ``CFLOW_*`` variables, calls ``run(shard)``, and afterwards kills every
process the shard started: the host is a child subreaper, so even a daemon in a new session is
still below it. A crash (``os._exit``, a segfault, SIGKILL on a timeout) takes down only this
process and fails only its own attempt; the worker starts a fresh host for the next shard.

``python -m worker.executors.host [--preload=MODULE,...] --spare`` starts a host before the worker
knows its task (while the worker waits for its first shard); its first line then names the task
to import. Meanwhile it imports the modules ``--preload`` names (installed modules the caller's
function needs, say numpy: a launcher started as a new interpreter has none of the caller's), so
that its task does not wait for them; one that cannot be imported is left to the task.

A worker forked from a Python caller (:mod:`runner.backends.local.launcher`) forks its hosts
instead (:func:`run_forked`): the caller has loaded what a host imports, so a host is ready in
a few milliseconds where a new interpreter takes a tenth of a second.

``python -m worker.executors.host --hangup TASK_DIR`` (a warm container's host,
:mod:`worker.executors.container.warm`) also ends, with everything below it, the moment the worker's
end of its requests closes, even in the middle of a shard: a container engine keeps a container
running after its worker died, and the parent-death signal that ends a host outside a container
cannot reach across the engine.

``recycle`` asks the worker to replace this host before the next shard: the task left threads
running, which would otherwise outlive its attempt inside this process.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import os
import select
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from worker.executors import reaper
from worker.executors.tracebacks import exception_line, task_traceback
from worker.executors.zygote import load_task
from worker.taskapi import TaskShard, return_text

_PYTHON_IGNORES = (signal.SIGPIPE, signal.SIGXFSZ)  # what a new interpreter ignores


def _fresh_streams() -> tuple[io.TextIOWrapper, io.TextIOWrapper]:
    out = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    err = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False),
        encoding="utf-8",
        errors="backslashreplace",
        line_buffering=True,
    )
    return out, err


def _flush(stream: Any) -> None:
    with contextlib.suppress(Exception):  # closed or replaced by the task: its own business
        stream.flush()


def run_one(run: Any, request: dict[str, Any], saved: tuple[int, int]) -> dict[str, Any]:
    """Run one shard in this process; the reply (exit code, the error's last line)."""
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout, sys.stderr = _fresh_streams()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])  # the attempt's own folder (the last one's is gone)
    threads_before = threading.active_count()
    code, reason, returned = 0, None, None
    try:
        shard = TaskShard.from_env()
        returned = return_text(run(shard))  # in the reply: no file made and removed a shard
    except SystemExit as exc:
        value = exc.code
        code = value if isinstance(value, int) else (0 if value is None else 1)
        if code:
            reason = f"SystemExit: {value}"
    except BaseException as exc:
        code = 1
        with contextlib.suppress(Exception):  # to fd 2: the task may have closed sys.stderr
            _StderrFd().write(task_traceback(exc))
        reason = exception_line(exc)
    _flush(sys.stdout)
    _flush(sys.stderr)
    reaper.kill_descendants(os.getpid())
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    sys.stdout, sys.stderr = _fresh_streams()
    recycle = threading.active_count() > threads_before
    reply = {"id": request["id"], "exit": code, "reason": reason, "recycle": recycle}
    if returned is not None:
        reply["return"] = returned
    return reply


class _StderrFd(io.TextIOBase):
    """Writes straight to fd 2 (the attempt's log), whatever the task did to ``sys.stderr``."""

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "backslashreplace")
        os.write(2, data)
        return len(text)


def _end_on_hangup(fd: int) -> None:
    """Wait until every writer of ``fd`` (a pipe) closed it, then end this host and what it
    started at once: the worker that would have read the replies is gone."""
    poller = select.poll()
    poller.register(fd, select.POLLHUP)
    while not any(event & (select.POLLHUP | select.POLLERR) for _, event in poller.poll()):
        pass
    reaper.kill_descendants(os.getpid())
    os._exit(1)


def serve(task_dir: Path | None, *, hangup: bool = False, preload: Sequence[str] = ()) -> None:
    """Serve shards of ``task_dir``; with None (a spare host, started before any shard was
    received) the first line names the task: {"task": DIR, "path": [...], "env": {...}}, and
    for one forked from its worker, the worker's import path ("sys_path"), which may have
    changed since the fork, and, for one forked before its worker had a log, the log
    ("stderr").
    With ``hangup``, end at once when the requests' writer is gone (see the module's notes);
    a spare imports the modules ``preload`` names first (:func:`preload_modules`)."""
    reaper.die_with_parent()
    reaper.become_subreaper()
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    if hangup:
        watch = threading.Thread(
            target=_end_on_hangup, args=(requests.fileno(),), name="hangup", daemon=True
        )
        watch.start()
    if task_dir is None:
        preload_modules(preload)
        gc.freeze()  # forked ahead: what it holds stays shared with its worker (never collected)
        first = requests.readline()
        if not first:
            return
        load = json.loads(first)
        os.environ.clear()  # the task's environment as it is now, not the one we started in
        os.environ.update(load["env"])
        if "sys_path" in load:  # forked ahead: the import path of the worker as it is now
            sys.path[:] = load["sys_path"]
            extra = os.environ.get("PYTHONPATH", "").split(os.pathsep)
            sys.path[0:0] = [p for p in extra if p and p not in sys.path]
        sys.path[0:0] = load["path"]
        if "stderr" in load:  # started before its worker had a log: its own errors go there
            fd = os.open(load["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 2)
            os.close(fd)
        os.chdir(load["task"])
        task_dir = Path(load["task"])
    # Keep the task's own prints (at import and later) out of the reply channel.
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(2, 1)
    os.close(null)
    sys.stdout, sys.stderr = _fresh_streams()

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        run = load_task(task_dir).run
    except BaseException as exc:
        reply({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    reply({"ready": True})
    saved = (os.dup(1), os.dup(2))
    for line in requests:
        reply(run_one(run, json.loads(line), saved))


def preload_modules(names: Sequence[str]) -> None:
    """Import these modules, as a spare host waits for its task; what they print goes to
    fd 2 (fd 1 is the replies' pipe until the task comes), and a module that cannot be
    imported here (another environment, an error at import) is left to the task. Once the
    task has come (on fd 0) no further one is begun: the modules were the last map's
    function's, and this map's may need none of them."""
    if not names:
        return
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        for name in names:
            if select.select([0], [], [], 0)[0]:
                break
            with contextlib.suppress(Exception, SystemExit):
                importlib.import_module(name)
    finally:
        _flush(sys.stdout)
        _flush(sys.stderr)
        os.dup2(saved, 1)
        os.close(saved)


def main(args: list[str]) -> None:
    """``python -m worker.executors.host ARGS``: ``[--hangup] TASK_DIR`` or
    ``[--preload=MODULE,...] --spare``."""
    target = args[-1]
    preload = [a.partition("=")[2] for a in args if a.startswith("--preload=")]
    serve(
        None if target == "--spare" else Path(target),
        hangup=args[:1] == ["--hangup"],
        preload=[name for names in preload for name in names.split(",") if name],
    )


def run_forked(
    args: list[str], env: dict[str, str], cwd: Path | None, requests: int, replies: int
) -> NoReturn:
    """In a child just forked from a one-thread worker: become ``python -m
    worker.executors.host ARGS`` started with ``env`` in ``cwd``, reading its requests from
    the pipe ``requests`` and writing its replies to ``replies``, and end with ``os._exit``
    (the worker's ``atexit`` handlers and finalizers never run here).

    It gets its own session, every other descriptor it inherited pointed at ``/dev/null``
    (fd 2, the worker's log, stays, as a spawned host's does), the signal handlers and
    streams of a new interpreter, ``env`` as its environment with its ``PYTHONPATH`` on
    ``sys.path``, and fresh random seeds.
    """

    def become() -> None:
        os.setsid()
        os.dup2(requests, 0)
        os.dup2(replies, 1)
        to_devnull([int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2])
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        paths = env.get("PYTHONPATH", "").split(os.pathsep)
        sys.path[0:0] = [p for p in paths if p and p not in sys.path]
        fresh_interpreter([__file__, *args])
        _reseed()
        main(args)

    exit_after(become)


def exit_after(body: Callable[[], None]) -> NoReturn:
    """End a forked child as ``python -m`` ends a program once ``body()`` returns or raises:
    status 0, a ``SystemExit``'s code, or 1 with the traceback printed; the standard streams
    flushed, then ``os._exit`` (its parent's ``atexit`` handlers and finalizers never run)."""
    code = 1
    try:
        body()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        with contextlib.suppress(Exception):
            traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        os._exit(code)


def to_devnull(fds: list[int]) -> None:
    """Point ``fds`` at ``/dev/null`` rather than closing them: a stale file object of the
    process this one was forked from, collected later, then closes a ``/dev/null``, never a
    descriptor opened since under the same number."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in fds:
        if fd != null:
            with contextlib.suppress(OSError):
                os.dup2(null, fd, inheritable=fd <= 2)
    os.close(null)


def fresh_interpreter(argv: list[str]) -> None:
    """What a new ``python`` process started with ``argv`` would have, where a fork left its
    parent's: default signal handlers and an empty signal mask, fresh standard streams on fds
    0 to 2, no logging handlers (the parent's files are not closed: they are the parent's)."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_IGN if sig in _PYTHON_IGNORES else signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout, sys.stderr = _fresh_streams()
    import logging  # here: a host started as a new interpreter never loads it

    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.WARNING)
    sys.argv = list(argv)


def _reseed() -> None:
    """New random states where a fork copied the parent's: ``random`` reseeds itself in a
    forked child, NumPy's global generator does not (two hosts would draw the same numbers)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):
            numpy.random.seed()


if __name__ == "__main__":
    main(sys.argv[1:])
