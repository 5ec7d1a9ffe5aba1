"""Two live workers never share a name's scratch folder in one store.

Seen once in the notebook test under a loaded suite: two workers named ``local-2`` ran at once,
and one's attempts removed the other's working folder under its running task (the shard failed
with ``FileNotFoundError`` for its own folder). A second worker under a live one's name now
does not start, says why in one line, and leaves the live one's folder alone.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import wait_for
from worker.agent.scratch import ScratchInUse, ScratchLock


def _worker(store: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "worker", "--backend", "local", "--store", str(store)),
            *("--name", name, "--idle-timeout", "60"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _held(folder: Path) -> bool:
    lock = ScratchLock(folder)
    try:
        lock.take()
    except ScratchInUse:
        return True
    lock.release()
    return False


@pytest.mark.e2e
def test_a_second_worker_under_a_live_ones_name_does_not_start(tmp_path: Path) -> None:
    store = tmp_path / "store"
    folder = store / "scratch" / "local-7"
    first = _worker(store, "local-7")
    try:
        wait_for(lambda: _held(folder), 30, "the first worker holding its scratch folder")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "keep").write_text("the first worker's")

        second = _worker(store, "local-7")
        out, _ = second.communicate(timeout=60)
        assert second.returncode == 0, out
        assert "another live worker of this store is named local-7" in out
        assert "worker local-7 exiting: its name is in use" in out
        assert (folder / "keep").read_text() == "the first worker's"
        assert first.poll() is None  # the live one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert not _held(folder)  # given back at its end: the name may be used again


@pytest.mark.e2e
def test_a_killed_workers_name_may_be_used_again_at_once(tmp_path: Path) -> None:
    store = tmp_path / "store"
    folder = store / "scratch" / "local-7"
    first = _worker(store, "local-7")
    wait_for(lambda: _held(folder), 30, "the first worker holding its scratch folder")
    first.kill()  # SIGKILL: no cleanup of its own; the system lets the lock go
    first.communicate(timeout=60)
    second = _worker(store, "local-7")
    try:
        wait_for(lambda: _held(folder), 30, "the second worker holding the folder")
        assert second.poll() is None
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=60)
    assert "in use" not in out
