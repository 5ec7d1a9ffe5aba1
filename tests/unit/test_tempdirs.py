"""What a killed CFlow process leaves in ``/tmp`` is removed by the next one.

The killed processes are real (a runner streaming its shards, killed with SIGKILL, leaves its
spool behind); the sweep is then run as a new process's first temporary folder runs it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from worker import tempdirs
from worker.tempdirs import ORPHAN_SECONDS, kept_temp_folder, sweep_orphans, temp_folder

ROOT = Path(__file__).resolve().parents[2]
LONG_AGO = time.time() - ORPHAN_SECONDS - 60


def _killed_leaving(tmp_path: Path, kind: str) -> Path:
    """The folder a process made with temp_folder(kind) before it was killed (SIGKILL)."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from worker.tempdirs import temp_folder
        folder = temp_folder({kind!r})
        (Path(folder.name) / "shards.jsonl").write_bytes(b"x" * 65536)
        print(folder.name, flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env
    )
    assert proc.stdout is not None
    folder = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert folder.exists()  # SIGKILL: no cleanup ran
    return folder


def test_a_killed_processs_folder_goes_with_the_next_sweep(tmp_path: Path) -> None:
    left = _killed_leaving(tmp_path, "stream")
    assert left.name.startswith("cflow-stream-")
    os.utime(left, (LONG_AGO, LONG_AGO))
    assert sweep_orphans(tmp_path) == [left.name]
    assert not left.exists()


def test_a_folder_still_changing_or_of_a_live_process_is_left(tmp_path: Path) -> None:
    recent = _killed_leaving(tmp_path, "fn")  # gone, but changed within ORPHAN_SECONDS
    live = tmp_path / f"cflow-fn-{os.getpid()}-abcdefgh"  # this process's own
    live.mkdir()
    os.utime(live, (LONG_AGO, LONG_AGO))
    other = tmp_path / "cflow-notes"  # not one of ours by its name
    other.mkdir()
    os.utime(other, (LONG_AGO, LONG_AGO))
    assert sweep_orphans(tmp_path) == []
    assert recent.exists() and live.exists() and other.exists()


def test_a_process_sweeps_once_as_it_makes_its_first_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    left = _killed_leaving(tmp_path, "combine")
    os.utime(left, (LONG_AGO, LONG_AGO))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    monkeypatch.setattr(tempdirs, "_swept", False)
    with temp_folder("check") as made:
        assert Path(made).name.startswith(f"cflow-check-{os.getpid()}-")
        assert not left.exists()
    kept = kept_temp_folder("mounts")  # a worker's, kept to its end
    assert kept.name.startswith(f"cflow-mounts-{os.getpid()}-") and kept.is_dir()


def test_a_name_with_a_number_no_process_can_have_is_left_and_breaks_nothing(
    tmp_path: Path,
) -> None:
    for pid in ("9999999999", "2147483648", "99999999999999999999"):
        odd = tmp_path / f"cflow-x-{pid}-abcdefgh"
        odd.mkdir()
        os.utime(odd, (LONG_AGO, LONG_AGO))
    assert sweep_orphans(tmp_path) == []
    assert len(os.listdir(tmp_path)) == 3
