"""A local worker stopped by a signal (SIGSTOP) is taken for frozen once it has stayed stopped
for its grace: no capacity, and deleted at once, since a stopped process may hold the store's
write lock and stall every other worker of the store."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.backends.local.fleet import LocalFleet, _stopped, stopped_grace
from tests.e2e.conftest import wait_for
from worker.backends.local.db import Db


def test_a_worker_stopped_past_its_grace_is_frozen_and_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CFLOW_LEASE_SECONDS", "1")
    monkeypatch.setenv("CFLOW_HEARTBEAT_SECONDS", "0.5")
    assert stopped_grace() == 1.5
    fleet = LocalFleet(tmp_path / "store", idle_timeout=60.0)
    try:
        (name,) = fleet.grow(1)
        pid = fleet._procs[name].pid
        wait_for(lambda: (tmp_path / "store" / "queue.db").exists(), what="the worker's store")
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: _stopped(pid), what="the worker to stop")  # the signal lands later
        (first,) = fleet.instances()
        assert first.error is None and not first.removable  # just stopped: within its grace
        time.sleep(stopped_grace())
        (later,) = fleet.instances()
        assert later.removable and later.error and "stopped by a signal" in later.error
        fleet.delete([name])  # SIGTERM with SIGCONT: it exits
        assert fleet.wait_empty(30)
    finally:
        for proc in fleet._procs.values():
            proc.kill()
        fleet.close()


def test_a_stopped_process_holding_the_write_lock_stalls_the_others(tmp_path: Path) -> None:
    """Why the grace exists: SQLite's write lock stays with a stopped process."""
    path = tmp_path / "queue.db"
    Db(path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, signal, sqlite3, sys\n"
            f"c = sqlite3.connect({str(path)!r}, isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "os.kill(os.getpid(), signal.SIGSTOP)\n"
            "c.execute('COMMIT')\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        other = sqlite3.connect(path, timeout=0.5, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        os.kill(holder.pid, signal.SIGCONT)  # what deleting a frozen worker does
        assert holder.wait(timeout=30) == 0
        other.execute("BEGIN IMMEDIATE")
        other.execute("COMMIT")
        other.close()
    finally:
        if holder.poll() is None:
            holder.kill()
