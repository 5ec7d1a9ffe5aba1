"""Runs a Python task's ``run(shard)`` in a process of its own per shard (``--isolate``).

The default is the warm host (:mod:`worker.executors.host`), which reuses one process per slot.
``python -m worker.executors.zygote TASK_DIR`` imports ``task.py`` once, then forks one child per
request: the child starts its own session (so the worker can kill the task's whole process group),
sends its output to the attempt's log, calls ``run(shard)`` and exits 0, or 1 with the traceback in
the log. A crash in the task kills only that child. The zygote itself is single-threaded so forking
is safe, and it dies with its worker.

Wire format on stdin/stdout, one JSON object per line:
  request  {"id": N, "log": PATH, "cwd": PATH, "env": {...}}   (the shard comes from env)
  replies  {"ready": true} | {"ready": false, "error": "..."} once at start,
           {"id": N, "pid": PID} when forked, {"id": N, "exit": CODE} when it ended
           (CODE is negative for a signal, as with subprocess).

``python -m worker.executors.zygote --combine TASK_DIR OUT LISTING ERROR`` calls the task's
``combine(paths, out)`` with the paths listed one per line in LISTING; when it raises, its
traceback goes to the file ERROR and the exit code is 1.

``python -m worker.executors.zygote --once TASK_DIR`` runs one shard from the environment in this
process: the fallback when the task does not import (each attempt's log then shows why).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import os
import selectors
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from worker.executors import reaper
from worker.executors.tracebacks import task_traceback
from worker.taskapi import TaskShard, keep_return


def load_task(task_dir: Path) -> ModuleType:
    sys.path.insert(0, str(task_dir))
    spec = importlib.util.spec_from_file_location("task", task_dir / "task.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {task_dir / 'task.py'}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["task"] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:  # a script's last line, sys.exit(main()): no run() ever ran
        raise ImportError(exited_on_import(exc.code)) from None
    return module


EXITED_0 = (
    "the task's process exited with code 0 mid-shard, before run(shard) returned (os._exit, say)"
)


def exited_on_import(code: object) -> str:
    """What a task.py that called ``sys.exit`` as it was imported is told."""
    return (
        f"task.py called sys.exit({code!r}) as it was imported, so run(shard) never ran; keep"
        ' a script\'s own code under `if __name__ == "__main__":`'
    )


def _call(run: Callable[[TaskShard], Any]) -> int:
    """Run one shard in this process; the exit code the task earned."""
    try:
        shard = TaskShard.from_env()
        keep_return(shard, run(shard))
        return 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException as exc:
        with contextlib.suppress(Exception):  # to fd 2: the task may have closed sys.stderr
            os.write(2, task_traceback(exc).encode("utf-8", "backslashreplace"))
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed or replaced by the task: its business
                stream.flush()


def _child(request: dict[str, Any], run: Callable[[TaskShard], Any], returned: int) -> None:
    os.setsid()
    reaper.die_with_parent()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    code = _call(run)
    os.write(returned, b"r")  # run(shard) returned (or raised): not an os._exit inside it
    os._exit(code)


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _said(fd: int) -> bool:
    """Whether the shard's child wrote that run(shard) returned (the pipe ``fd`` closed)."""
    try:
        return bool(os.read(fd, 1))
    except BlockingIOError:  # nothing written, the other end still held by a child's child
        return False
    finally:
        os.close(fd)


def serve(task_dir: Path) -> None:
    reaper.die_with_parent()
    reaper.become_subreaper()  # what a shard's child leaves is reparented here, and killed
    out = sys.stdout
    # Keep the task's import-time prints out of the reply channel.
    sys.stdout = sys.stderr

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        module = load_task(task_dir)
        run = module.run
    except BaseException as exc:
        reply({"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        return
    reply({"ready": True})
    gc.freeze()  # keep the collector from touching (and so copying) the imported objects per fork

    sel = selectors.DefaultSelector()
    stdin = sys.stdin.buffer
    sel.register(stdin.fileno(), selectors.EVENT_READ, None)
    # pidfd -> (pid, request id, token, the pipe its child says run(shard) returned on)
    children: dict[int, tuple[int, int, str, int]] = {}
    pending = b""
    open_input = True
    while open_input or children:
        for key, _ in sel.select():
            if key.data is None:
                chunk = os.read(stdin.fileno(), 65536)
                if not chunk:
                    open_input = False
                    sel.unregister(stdin.fileno())
                    for pid, _, _, _ in children.values():
                        _killpg(pid)
                    continue
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    request = json.loads(line)
                    sys.stderr.flush()
                    said, returned = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(said)
                        _child(request, run, returned)
                    os.close(returned)
                    os.set_blocking(said, False)  # a child's child may hold its other end
                    pidfd = os.pidfd_open(pid)
                    token = request["env"].get(reaper.TOKEN_VAR, "")
                    children[pidfd] = (pid, request["id"], token, said)
                    sel.register(pidfd, selectors.EVENT_READ, pidfd)
                    reply({"id": request["id"], "pid": pid})
            else:
                pidfd = key.data
                pid, request_id, _, said = children.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                _killpg(pid)  # what the shard left in its group, then what escaped it
                reaper.sweep_orphans(
                    os.getpid(),
                    live_tokens={token for _, _, token, _ in children.values()},
                    known={p for p, _, _, _ in children.values()},
                )
                code = _exit_code(status)
                if code == 0 and not _said(said):  # os._exit(0) in run: as a warm host says
                    reply({"id": request_id, "exit": 1, "reason": EXITED_0})
                else:
                    reply({"id": request_id, "exit": code})


def _killpg(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--combine"]:
        task_dir, out, listing, error = (Path(a) for a in argv[1:5])
        paths = [Path(line) for line in listing.read_text().splitlines() if line]
        try:
            load_task(task_dir).combine(paths, out)
        except Exception as exc:
            error.write_text(task_traceback(exc, task_dir), encoding="utf-8")
            sys.exit(1)
        return
    if argv[:1] == ["--once"]:
        try:
            run = load_task(Path(argv[1])).run
        except Exception as exc:  # the task does not import: the attempt's log says why
            os.write(2, task_traceback(exc, Path(argv[1])).encode("utf-8", "backslashreplace"))
            sys.exit(1)
        sys.exit(_call(run))
    serve(Path(argv[0]))


if __name__ == "__main__":
    main(sys.argv[1:])
