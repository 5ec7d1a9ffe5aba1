"""The emulators' helper leaves nothing behind: the folder of their logs goes when they stop.

Every start made a ``cflow-emulators-*`` folder in ``/tmp`` that no stop removed (260 of them
here after a few days' test runs). A real process stands in for each emulator: what is checked
is what the helper does at a stop, not the emulators.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.emulators import Emulators, stop_shared


def _started(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    logs = tmp_path / "cflow-emulators-x"
    logs.mkdir()
    (logs / "pubsub.log").write_bytes(b"started\n")
    return subprocess.Popen(["sleep", "60"]), logs


def test_stopping_emulators_started_here_removes_their_logs(tmp_path: Path) -> None:
    proc, logs = _started(tmp_path)
    Emulators("127.0.0.1:1", "http://127.0.0.1:2", [proc], logs).stop()
    assert proc.returncode is not None
    assert not logs.exists()


def test_emulators_used_from_elsewhere_leave_their_logs_to_whoever_started_them(
    tmp_path: Path,
) -> None:
    proc, logs = _started(tmp_path)
    try:
        Emulators("127.0.0.1:1", "http://127.0.0.1:2", [], logs).stop()  # the session's
        assert proc.poll() is None
        assert (logs / "pubsub.log").exists()
    finally:
        proc.kill()
        proc.wait()


def test_the_sessions_stop_removes_the_logs_of_the_emulators_it_stops(tmp_path: Path) -> None:
    proc, logs = _started(tmp_path)
    session = tmp_path / "session"
    session.mkdir()
    state = {"pubsub": "127.0.0.1:1", "gcs": "http://127.0.0.1:2", "logs": str(logs)}
    (session / "emulators.json").write_text(json.dumps({**state, "pids": [proc.pid]}))
    stop_shared(session)
    assert proc.wait(5) is not None
    assert not logs.exists()
    assert not session.exists()
