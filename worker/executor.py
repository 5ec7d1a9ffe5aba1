"""Starts task attempts in their own process group, with output going to the attempt's log.

``task.sh`` runs under bash; ``task.py`` runs in a child forked from a per-bundle zygote that
imported the task once (see :mod:`worker.zygote`), or in a fresh interpreter per shard when the
import fails or ``CFLOW_FORK=0``. Either way the worker only sees a :class:`RunningTask`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

import worker
from worker.bundle import SHELL_ENTRY, UnpackedBundle
from worker.protocol import Entry
from worker.taskapi import TaskShard

_WORKER_PATH = str(Path(worker.__file__).resolve().parent.parent)


class RunningTask(ABC):
    """One attempt's process (group)."""

    pid: int | None = None

    @abstractmethod
    def wait(self, timeout: float | None) -> int | None:
        """The exit code (negative: killed by that signal), or None if still running."""

    def signal(self, sig: int) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # the group is not ours yet (setsid pending): the leader alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def stop(self, grace: float) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` seconds; the exit code."""
        self.signal(signal.SIGTERM)
        code = self.wait(grace)
        if code is None:
            self.signal(signal.SIGKILL)
            code = self.wait(10.0)
        else:
            self.signal(signal.SIGKILL)  # leftovers of the group
        return code


class _PopenTask(RunningTask):
    def __init__(self, proc: subprocess.Popen[bytes]):
        self._proc = proc
        self.pid = proc.pid

    def wait(self, timeout: float | None) -> int | None:
        # Block on a pidfd rather than Popen's sleep-polling, so short tasks end promptly.
        if timeout is not None and self._proc.returncode is None:
            fd = os.pidfd_open(self._proc.pid)
            try:
                select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
        try:
            return self._proc.wait(0 if timeout is not None else None)
        except subprocess.TimeoutExpired:
            return None


class _ZygoteTask(RunningTask):
    def __init__(self) -> None:
        self._started = threading.Event()
        self._done = threading.Event()
        self.code: int | None = None

    def _set_pid(self, pid: int) -> None:
        self.pid = pid
        self._started.set()

    def _finish(self, code: int) -> None:
        self.code = code
        self._started.set()
        self._done.set()

    def wait(self, timeout: float | None) -> int | None:
        self._done.wait(timeout)
        return self.code if self._done.is_set() else None

    def signal(self, sig: int) -> None:
        self._started.wait(10.0)  # the zygote replies with the pid right after forking
        super().signal(sig)


class Executor:
    """Starts attempts of one unpacked bundle."""

    def __init__(self, bundle: UnpackedBundle, entry: Entry, *, fork: bool | None = None):
        self.bundle = bundle
        self.entry = entry
        if fork is None:
            fork = os.environ.get("CFLOW_FORK", "1") != "0"
        self._zygote: _Zygote | None = None
        if entry is Entry.PYTHON and fork:
            zygote = _Zygote(bundle, self._base_env())
            if zygote.ready:
                self._zygote = zygote
            else:
                zygote.close()

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [self.bundle.python_path(), _WORKER_PATH]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, shard: TaskShard, log_path: Path) -> RunningTask:
        """Start one attempt; ``log_path``'s folder must exist. Creates the output folder."""
        shard.output_dir.mkdir(parents=True, exist_ok=True)
        if self._zygote is not None and not self._zygote.alive:
            self._zygote.close()  # it crashed (a task killed it?): start a fresh one
            zygote = _Zygote(self.bundle, self._base_env())
            self._zygote = zygote if zygote.ready else None
        if self._zygote is not None:
            return self._zygote.start(shard, log_path, self.bundle.root)
        if self.entry is Entry.SHELL:
            argv = ["bash", str(self.bundle.root / SHELL_ENTRY)]
        else:
            argv = [sys.executable, "-m", "worker.zygote", "--once", str(self.bundle.root)]
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                cwd=self.bundle.root,
                env={**self._base_env(), **shard.env()},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return _PopenTask(proc)

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None


class _Zygote:
    def __init__(self, bundle: UnpackedBundle, env: dict[str, str]):
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker.zygote", str(bundle.root)],
            cwd=bundle.root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin: IO[bytes] = self._proc.stdin
        self._stdout: IO[bytes] = self._proc.stdout
        self._ids = itertools.count(1)
        self._tasks: dict[int, _ZygoteTask] = {}
        self._lock = threading.Lock()
        first = self._stdout.readline()
        self.ready = bool(first) and bool(json.loads(first).get("ready"))
        if self.ready:
            threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def start(self, shard: TaskShard, log_path: Path, cwd: Path) -> RunningTask:
        task = _ZygoteTask()
        with self._lock:
            request_id = next(self._ids)
            self._tasks[request_id] = task
            request = {"id": request_id, "log": str(log_path), "cwd": str(cwd), "env": shard.env()}
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
        for line in self._stdout:
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
                task._finish(msg["exit"])
        with self._lock:  # the zygote died: every attempt it held is lost
            orphans, self._tasks = self._tasks, {}
        for task in orphans.values():
            task._finish(-int(signal.SIGKILL))

    @property
    def alive(self) -> bool:
        return self._proc.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
