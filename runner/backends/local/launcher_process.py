"""The launcher's own process: forked from the caller, it forks the caller's local workers on
request, some ahead (see :mod:`runner.backends.local.launcher`, the caller's side).

It reads request lines on one pipe and replies a line each on another:

- ``{"args": [...], "log": PATH, "env": {...}, "cwd": DIR, "path": [...]}``: a worker running
  ``python -m worker ARGS`` with its output appended to ``log``, in the caller's environment,
  folder and import path as they are now (not as they were when the launcher was forked); the
  reply is its pid and start time, or an error;
- ``{"ahead": N, "preload": [MODULE, ...]}``: workers forked ahead up to ``N``, each with a
  spare task host of its own, which imports the modules named while it waits (those forked
  ahead later import the same, until another request names others); the reply once they have
  their host.

Every reply also says how many wait ahead (``"ahead"``). It exits when the caller closes its
end, or after :data:`IDLE_SECONDS` with no request (``CFLOW_LAUNCHER_IDLE_SECONDS`` sets
another; a kept launcher the caller has not used for that long: what it holds of the caller's
memory goes with it; the next run forks another).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import worker
from worker import cli  # loaded in the caller, so neither the launcher nor a worker loads it
from worker.agent.caller import process_start
from worker.executors.host import exit_after, fresh_interpreter, to_devnull
from worker.executors.host_client import SPARE_HOSTS, fork_hosts

IDLE_SECONDS = 300.0  # a launcher asked nothing for this long exits
IDLE_ENV = "CFLOW_LAUNCHER_IDLE_SECONDS"  # another such time, read as the launcher starts
WORKER_MAIN = str(Path(worker.__file__).with_name("__main__.py"))  # a worker's sys.argv[0]
READY_SECONDS = 5.0  # how long a call for workers ahead waits for them to have their hosts


def _lines(fd: int, idle: float) -> Iterator[bytes]:
    """Request lines read from ``fd`` until it ends or nothing comes for ``idle`` seconds."""
    buffered = b""
    while True:
        while b"\n" not in buffered:
            ready, _, _ = select.select([fd], [], [], idle)
            if not ready:
                return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buffered += chunk
        line, _, buffered = buffered.partition(b"\n")
        yield line


def idle_seconds() -> float:
    """How long a launcher asked nothing waits before it exits: :data:`IDLE_SECONDS`, or
    ``CFLOW_LAUNCHER_IDLE_SECONDS`` where set to a positive number."""
    try:
        seconds = float(os.environ.get(IDLE_ENV, ""))
    except ValueError:
        return IDLE_SECONDS
    return seconds if seconds > 0 else IDLE_SECONDS


def serve(  # pragma: no cover - the launcher's own process
    requests: int,
    replies: int,
    standby: int,
    *,
    hello: bool = False,
    preload: Sequence[str] = (),
) -> None:
    """The launcher's loop (see the module's notes): ``standby`` workers forked ahead (with
    ``hello``, a line saying so once they are ready: a launcher started as a new interpreter),
    their hosts importing ``preload``, then a reply for each request line, until the caller
    closes its end or asks nothing for :data:`IDLE_SECONDS`."""
    with contextlib.suppress(PermissionError):  # started in a session of its own already
        os.setsid()
    inherited = [int(fd) for fd in os.listdir("/proc/self/fd")]
    to_devnull([fd for fd in inherited if fd not in (requests, replies)])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the caller's Ctrl-C is the caller's
    signal.signal(signal.SIGCHLD, _reap)
    cli.parse_args([])  # its parser's first use too (the regular expressions argparse compiles)
    # Every object so far out of the collector's reach: a collection in a worker forked from
    # here would write to each one it looks at, copying the memory the fork shared.
    gc.freeze()
    SPARE_HOSTS.preload = list(preload)  # what each standby's spare host imports as it waits

    own = [requests, replies]
    standbys: list[tuple[int, int]] = []  # (pid, the write end it reads its request from)

    def fork_ahead(count: int) -> list[int]:
        """Standbys forked up to ``count``; the pipes they say they are ready on."""
        readies = []
        while len(standbys) < count:
            try:
                pid, tell, ready = _standby(own + [fd for _, fd in standbys])
            except OSError:  # one fewer ahead: it is forked when asked
                break
            standbys.append((pid, tell))
            readies.append(ready)
        return readies

    if hello:  # started as a new interpreter: said ready once its workers ahead are
        _ready(fork_ahead(standby))
        os.write(replies, json.dumps({"ready": True, "ahead": len(standbys)}).encode() + b"\n")
    else:
        for fd in fork_ahead(standby):  # the first run asks for them at once: not waited for
            os.close(fd)
    try:
        for line in _lines(requests, idle_seconds()):
            request = json.loads(line)
            reply: dict[str, Any] = {}
            if "ahead" in request:  # between runs: the reply once they are ready
                SPARE_HOSTS.preload = [str(name) for name in request.get("preload", [])]
                _ready(fork_ahead(int(request["ahead"])))
            while "args" in request and standbys and not reply:
                pid, told = standbys.pop(0)
                with contextlib.suppress(OSError):  # gone (killed): the next, or a fork
                    os.write(told, line + b"\n")
                    reply = _started(pid)
                os.close(told)
            if "args" in request and not reply:
                reply = _fork(request, own + [fd for _, fd in standbys])
            reply["ahead"] = len(standbys)
            os.write(replies, json.dumps(reply).encode() + b"\n")
    finally:
        os.close(requests)


def _fork(request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """A worker forked now for ``request``: the reply (its pid and start time, or an error)."""
    # SIGCHLD held: a worker that exits at once is still there to read its start time.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        pid = os.fork()
        if pid == 0:
            _worker(request, fds)
        return _started(pid)
    except OSError as exc:
        return {"error": f"could not fork a worker: {exc}"}
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


def _standby(fds: list[int]) -> tuple[int, int, int]:
    """A worker forked ahead: it forks a spare task host ahead too (as a local worker does as
    it starts; the host learns its task, environment and import path when given it), says so
    on a pipe, waits for its request on a pipe of its own, then runs it, or exits when that
    pipe closes unused (the launcher closed, or was killed). Its pid, the pipe it is told on,
    and the one it says it is ready on (closed by it then, or as it exits)."""
    told, tell = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(tell)
            os.close(ready_r)
            to_devnull(fds)  # the launcher's pipes and the other standbys' (see to_devnull)
            fork_hosts()
            with contextlib.suppress(OSError):  # none ahead: the worker starts one as it runs
                SPARE_HOSTS.start(1)
            # What becoming a worker costs that no request changes, done while nobody waits:
            # a new interpreter's signals, streams and logging, and the first use of the
            # worker's parser (memory a fork shared is copied as it is first written).
            fresh_interpreter([WORKER_MAIN])
            cli.parse_args([])
            gc.freeze()  # what it holds now is never collected: its memory stays shared
            os.close(ready_w)
            with os.fdopen(told, "rb") as waiting:
                line = waiting.readline()
            if line:
                _worker(json.loads(line), [], fresh=False)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(told)
    os.close(ready_w)
    return pid, tell, ready_r


def _ready(fds: list[int], timeout: float = READY_SECONDS) -> None:
    """Wait until standbys just forked have their spare hosts (each closes its end), at most
    ``timeout`` seconds; closes the pipes."""
    deadline = time.monotonic() + timeout
    waiting = list(fds)
    while waiting and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(waiting, [], [], left)
        for fd in ready:
            with contextlib.suppress(OSError):
                if not os.read(fd, 1):
                    waiting.remove(fd)
    for fd in fds:
        os.close(fd)


def _started(pid: int) -> dict[str, Any]:
    """The reply for worker ``pid``: its pid and start time, or an error if it is gone."""
    start = process_start(pid)
    if start is None:
        return {"error": f"the forked worker {pid} exited at once"}
    return {"pid": pid, "start": start}


def _reap(signum: int, frame: object) -> None:  # pragma: no cover - the launcher's process
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _worker(request: dict[str, Any], launcher_fds: list[int], *, fresh: bool = True) -> NoReturn:
    """In the forked child: become ``python -m worker ARGS`` started by the caller as it is
    now (its environment, folder and import path, not the launcher's from when it was forked);
    never returns. ``fresh=False``: the new interpreter's state was made ahead (a standby)."""
    args = request["args"]

    def become() -> None:
        os.setsid()
        to_devnull(launcher_fds)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.path[:] = request["path"]
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        SPARE_HOSTS.log = request["log"]  # a spare it forked ahead writes there too
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        if fresh:
            fresh_interpreter([WORKER_MAIN, *args])
        else:
            sys.argv = [WORKER_MAIN, *args]
        cli.main(args)

    exit_after(become)


if __name__ == "__main__":  # pragma: no cover - a launcher started as a new interpreter
    # (Launcher.spawn): its requests on stdin, its replies on stdout.
    _code = 0
    try:
        serve(0, 1, int(sys.argv[1]), hello=True, preload=json.loads(sys.argv[2]))
    except BaseException:
        _code = 1
    finally:
        os._exit(_code)
