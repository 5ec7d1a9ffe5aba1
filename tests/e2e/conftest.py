"""End-to-end helpers: the real ``runner`` CLI in a subprocess, with real worker processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def run_id(self) -> str:
        return self.stdout.strip().splitlines()[0]


class Cli:
    """Runs ``python -m runner`` against one store, as a user would in a shell."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.store = workdir / ".cflow"
        # The product's own lease and heartbeat: a worker starved of the CPU for a while on a
        # loaded machine keeps its shards. A test about a lapsing lease sets a short one.
        self.env = {
            **os.environ,
            "CFLOW_STORE": str(self.store),
            "PYTHONPATH": str(REPO),
            "COLUMNS": "200",
        }
        for name in (
            "CFLOW_DEPLOYMENT",
            "CFLOW_BACKEND",
            "CFLOW_LEASE_SECONDS",
            "CFLOW_HEARTBEAT_SECONDS",
        ):
            self.env.pop(name, None)

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "runner", *args]

    def __call__(self, *args: str, timeout: float = 120) -> Result:
        proc = subprocess.run(
            self.argv(*args),
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def status(self, run_id: str) -> dict[str, Any]:
        result = self("status", run_id, "--json")
        assert result.code == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def workers(self) -> dict[str, int]:
        """Live worker processes of the local fleet: name -> pid."""
        out = {}
        for path in (self.store / "fleet" / "live").glob("*.json"):
            try:
                text = path.read_text()
            except FileNotFoundError:  # the worker went since the folder was listed
                continue
            if text:  # an empty file is a name claimed by a runner that is starting its process
                out[path.stem] = json.loads(text)["pid"]
        return out

    def records(self, pattern: str) -> dict[str, Any]:
        """The store's records (result.json, failed.json, attempt status.json) whose key
        matches the glob ``pattern``: they are rows of queue.db, not files."""
        db = self.store / "queue.db"
        if not db.exists():
            return {}
        conn = sqlite3.connect(db, timeout=30)
        try:
            rows = conn.execute("SELECT key, data FROM records WHERE key GLOB ?", (pattern,))
            return {key: json.loads(data) for key, data in rows.fetchall()}
        except sqlite3.OperationalError:  # not made yet
            return {}
        finally:
            conn.close()

    def running_attempts(self) -> list[dict[str, Any]]:
        statuses = self.records("runs/*/shards/*/attempts/*/status.json").values()
        return [s for s in statuses if s["state"] == "running"]

    def attempt_states(self, run_id: str) -> list[str]:
        """The state of every attempt of every shard of a run, as `runner status` shows them."""
        return [a["state"] for s in self.status(run_id)["shards"] for a in s["attempts"]]


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    yield c
    _stop_workers(c.store)  # a test that failed (or detached) leaves no worker behind


def _stop_workers(store: Path) -> None:
    """SIGTERM the store's workers still running, then SIGKILL what is left after 10 s."""
    mine = str(store).encode()
    pids = []
    for path in (store / "fleet" / "live").glob("*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            pid = int(json.loads(path.read_text())["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"worker" in cmdline and mine in cmdline:
                pids.append(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            pids = living(pids)
            time.sleep(0.05)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def alive(pid: int) -> bool:
    """The process runs: it exists and is not a zombie waiting to be reaped."""
    return Path(f"/proc/{pid}").exists() and not _zombie(pid)


def living(pids: Iterable[int]) -> list[int]:
    return [pid for pid in pids if alive(pid)]


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_task(folder: Path, body: str, *, name: str = "task.py") -> Path:
    """Write a task folder whose task.py (or task.sh) is ``body``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    if name.endswith(".sh"):
        path.chmod(0o755)
    return folder


def make_inputs(folder: Path, names: list[str], rows: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        lines = ["id,value"] + [f"{name}-{i},{n * 10 + i}" for i in range(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder
