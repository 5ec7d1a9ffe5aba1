"""The worker's side of the fork-per-shard zygote (``--isolate``; see
:mod:`worker.executors.zygote`)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from worker.bundle import UnpackedBundle
from worker.executors import reaper
from worker.executors.base import PROCESSES, RunningTask


class ZygoteTask(RunningTask):
    def __init__(self, token: str, zygote: Zygote) -> None:
        self.token = token
        self._zygote = zygote
        self._started = threading.Event()
        self._done = threading.Event()
        self.code: int | None = None
        self.not_started = False  # the zygote ended before it forked this shard's process
        self.stopped = False  # we stopped it (a timeout, a preemption, a cancel)

    @property
    def loading(self) -> bool:
        """Whether the zygote has not yet said its task loaded (``task.py`` is being imported)."""
        return self._zygote.ready is None

    def _set_pid(self, pid: int) -> None:
        self.pid = pid
        self._started.set()

    def _finish(self, code: int, reason: str | None = None) -> None:
        self.code = code
        self.reason = reason
        self._started.set()
        self._done.set()

    def wait(self, timeout: float | None) -> int | None:
        self._done.wait(timeout)
        if not self._done.is_set():
            return None
        PROCESSES.discard(self.token)  # the zygote killed what the child left
        return self.code

    def signal(self, sig: int) -> None:
        if self.pid is None and self._zygote.ready is None:  # its import is what runs
            self._zygote.signal(sig)
            return
        self._started.wait(10.0)  # the zygote replies with the pid right after forking
        super().signal(sig)

    def stop(self, grace: float) -> int | None:
        self.stopped = True
        return super().stop(grace)


class Zygote:
    """The zygote process of one bundle, and the shards it forks a process for.

    Its first line says whether the task loaded (``ready``: None until it came); it is read by
    the reader thread, not waited for, so the first shards are sent at once and a ``task.py``
    whose import hangs is timed out, cancelled or preempted with them. Shards of a zygote that
    ended before forking them (their task would not load) are ``not_started``."""

    def __init__(self, bundle: UnpackedBundle, env: dict[str, str]):
        self._proc = PROCESSES.spawn(
            [sys.executable, "-m", "worker.executors.zygote", str(bundle.root)],
            None,
            cwd=bundle.root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._stdout: IO[bytes] = self._proc.stdout
        self._ids = itertools.count(1)
        self._tasks: dict[int, ZygoteTask] = {}
        self._lock = threading.Lock()
        self.ready: bool | None = None  # whether its task loaded (None: not said yet)
        self._ended = False  # its reader saw it end: a shard sent now is never answered
        self._stopped = False  # we signalled it as it loaded (a shard's timeout, a cancel)
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the zygote itself (it is loading the task)."""
        self._stopped = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def start(self, env: dict[str, str], log_path: Path, cwd: Path, token: str) -> RunningTask:
        task = ZygoteTask(token, self)
        with self._lock:
            if self._ended:
                task.not_started = True
                task._finish(-int(signal.SIGKILL))
                return task
            request_id = next(self._ids)
            self._tasks[request_id] = task
            request = {"id": request_id, "log": str(log_path), "cwd": str(cwd), "env": env}
            try:
                self._stdin.write(json.dumps(request).encode() + b"\n")
                self._stdin.flush()
            except (BrokenPipeError, ValueError):
                self._tasks.pop(request_id, None)
                task._finish(-int(signal.SIGKILL))
                with log_path.open("a") as log:
                    log.write("cflow: the task host process died\n")
        return task

    def _read(self) -> None:
        first, loaded = self._stdout.readline(), False
        with contextlib.suppress(ValueError):
            loaded = bool(first) and bool(json.loads(first).get("ready"))
        if loaded or first or not self._stopped:  # else ended by our hand as it loaded
            self.ready = loaded  # False: the task would not load
        for line in self._stdout if loaded else ():
            msg: dict[str, Any] = json.loads(line)
            with self._lock:
                task = self._tasks.get(msg["id"])
                if "exit" in msg:
                    self._tasks.pop(msg["id"], None)
            if task is None:
                continue
            if "pid" in msg:
                task._set_pid(msg["pid"])
            else:
                task._finish(msg["exit"], msg.get("reason"))
        with self._lock:  # the zygote died: every attempt it held is lost
            orphans, self._tasks = self._tasks, {}
            self._ended = True
        reaper.kill_group(self._proc.pid)
        for task in orphans.values():
            if task.pid is not None:
                reaper.kill_group(task.pid)
            PROCESSES.ended(task.token, task.pid)
            task.not_started = task.pid is None and not task.stopped
            task._finish(-int(signal.SIGKILL))

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None and not self._ended

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        PROCESSES.forget(self._proc.pid)
