"""Starts task attempts and guarantees that nothing of an attempt outlives it.

- ``task.py`` runs in a **warm host** per worker slot (:mod:`worker.executors.host`, started and
  spoken to by :mod:`worker.executors.host_client`): imported once, then shard after shard in
  the same process, as ``multiprocessing.Pool`` does. A crash
  kills only that host and fails only its attempt; the next shard gets a fresh host.
- With ``isolate`` (``--isolate``, or ``CFLOW_ISOLATE=1``) each shard runs in a child forked from
  a per-bundle zygote (:mod:`worker.executors.zygote`) instead: a task that leaks state between
  shards cannot leak it, at the cost of a fork per shard.
- ``task.sh`` runs under bash in its own session, and dies with its worker.

Every attempt carries a token in its environment (:mod:`worker.executors.reaper`); when an attempt
ends, however it ends, its process group is killed and so is every orphan that carries its token.
The worker only sees a :class:`~worker.executors.base.RunningTask`.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

from worker.bundle import SHELL_ENTRY, UnpackedBundle
from worker.executors import reaper
from worker.executors.base import (
    PROCESSES,
    WORKER_PATH,
    RunningTask,
    TaskExecutor,
    fresh_cwd,
    pdeathsig,
    wait_process,
)
from worker.executors.host_client import Host, HostTask, start_host
from worker.executors.zygote_client import Zygote
from worker.protocol import Entry
from worker.taskapi import TaskShard


class _ShellTask(RunningTask):
    def __init__(self, proc: subprocess.Popen[bytes], token: str):
        self._proc = proc
        self.pid = proc.pid
        self.token = token
        self._ended = False

    def wait(self, timeout: float | None) -> int | None:
        code = wait_process(self._proc, timeout)
        if code is None:
            return None
        self._end()
        return code

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        assert self.pid is not None
        reaper.kill_group(self.pid)  # what it left in its group
        PROCESSES.forget(self.pid)
        PROCESSES.ended(self.token, self.pid)  # and what escaped the group


class Executor(TaskExecutor):
    """Starts attempts of one unpacked bundle; ``slot`` picks the warm host to use."""

    def __init__(self, bundle: UnpackedBundle, entry: Entry, *, isolate: bool | None = None):
        self.bundle = bundle
        self.entry = entry
        if isolate is None:
            isolate = os.environ.get("CFLOW_ISOLATE", "0") == "1"
        self.isolate = isolate
        self._hosts: dict[int, Host] = {}
        self._cold = False  # the task does not import: a fresh interpreter per shard shows why
        self._zygote: Zygote | None = None
        self._lock = threading.Lock()

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [self.bundle.python_path(), WORKER_PATH]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self, shard: TaskShard, log_path: Path, *, slot: int = 0) -> RunningTask:
        """Start one attempt; ``log_path``'s folder must exist. Creates the output folder."""
        shard.output_dir.mkdir(parents=True, exist_ok=True)
        cwd = fresh_cwd(shard)
        token = secrets.token_hex(8)
        env = {**shard.env(), reaper.TOKEN_VAR: token}
        if self.entry is Entry.SHELL:
            return self._start_shell(env, log_path, token, cwd)
        if self.isolate:
            return self._start_isolated(env, log_path, token, cwd)
        host = self._host(slot)
        if host is None:
            return self._start_cold(env, log_path, token, cwd)
        PROCESSES.begin(token)
        request_id = host.requests
        request = {"id": request_id, "log": str(log_path), "cwd": str(cwd)}
        request["env"] = env
        host.requests += 1
        if not host.send(request):
            host.recycle = True
        return HostTask(host, request_id, token, log_path)

    @property
    def queues(self) -> bool:
        """Several shards may be started at once on one slot: they queue in its warm host."""
        return self.entry is Entry.PYTHON and not self.isolate and not self._cold

    def _host(self, slot: int) -> Host | None:
        if self._cold:
            return None
        host = self._hosts.get(slot)
        if host is not None and host.alive:
            return host
        if host is not None:
            host.close()
            del self._hosts[slot]
            if host.ready is False:  # its task would not load: a process per attempt says why
                self._cold = True
                return None
        host = self._hosts[slot] = Host(start_host(self.bundle, self._base_env()))
        return host

    def _start_shell(
        self, env: dict[str, str], log_path: Path, token: str, cwd: Path
    ) -> RunningTask:
        with log_path.open("ab") as log:
            proc = PROCESSES.spawn(
                ["bash", str(self.bundle.root / SHELL_ENTRY)],
                token,
                cwd=cwd,
                env={**self._base_env(), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pdeathsig,  # bash dies with its worker
            )
        return _ShellTask(proc, token)

    def _start_cold(
        self, env: dict[str, str], log_path: Path, token: str, cwd: Path
    ) -> RunningTask:
        argv = [sys.executable, "-m", "worker.executors.zygote", "--once", str(self.bundle.root)]
        with log_path.open("ab") as log:
            proc = PROCESSES.spawn(
                argv,
                token,
                cwd=cwd,
                env={**self._base_env(), **env},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=pdeathsig,
            )
        return _ShellTask(proc, token)

    def _start_isolated(
        self, env: dict[str, str], log_path: Path, token: str, cwd: Path
    ) -> RunningTask:
        if self._cold:
            return self._start_cold(env, log_path, token, cwd)
        with self._lock:
            if self._zygote is not None and not self._zygote.alive:
                self._zygote.close()
                if self._zygote.ready is False:  # its task would not load: a process per
                    self._cold = True  # attempt says why
                    self._zygote = None
                    return self._start_cold(env, log_path, token, cwd)
                self._zygote = None
            if self._zygote is None:
                self._zygote = Zygote(self.bundle, self._base_env())
            zygote = self._zygote
        PROCESSES.begin(token)
        task: RunningTask = zygote.start(env, log_path, cwd, token)
        return task

    def begin_close(self) -> None:
        """Tell every warm host to exit once its shards are done; :meth:`close` waits."""
        for host in self._hosts.values():
            host.begin_close()

    def close(self) -> None:
        self.begin_close()  # every host winds down at once, then each is waited for
        for host in self._hosts.values():
            host.close()
        self._hosts.clear()
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None
