"""The warm task host on its own: the oldest Python an image may bring, and ``--hangup``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


def _python39() -> str | None:
    """A Python 3.9 interpreter: pyenv's build (not its shim, which needs a version chosen), or
    one on PATH."""
    pyenv = sorted((Path.home() / ".pyenv" / "versions").glob("3.9*/bin/python"))
    if pyenv:
        return str(pyenv[0])
    found = shutil.which("python3.9")
    return None if found is None or "shims" in found else found


def _host(python: str, task_dir: Path, *flags: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [python, "-m", "worker.executors.host", *flags, str(task_dir)],
        env=env,
        cwd=task_dir,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def _request(tmp_path: Path, n: int) -> bytes:
    env = {"CFLOW_RUN_ID": "r", "CFLOW_SHARD_ID": f"s{n}", "CFLOW_ATTEMPT": "1"}
    env["CFLOW_OUTPUT_DIR"] = str(tmp_path)
    request = {"id": n, "log": str(tmp_path / f"log-{n}.txt"), "cwd": str(tmp_path), "env": env}
    return json.dumps(request).encode() + b"\n"


def test_the_host_runs_on_python_3_9(tmp_path: Path) -> None:
    python = _python39()
    if python is None:
        pytest.skip("no Python 3.9 here (an image's interpreter may be that old)")
    (tmp_path / "task.py").write_text(
        "def run(shard):\n    if shard.id == 's0':\n        raise ValueError('row 3')\n"
    )
    host = _host(python, tmp_path)
    assert host.stdin is not None and host.stdout is not None
    host.stdin.write(_request(tmp_path, 0) + _request(tmp_path, 1))
    host.stdin.close()
    replies = [json.loads(line) for line in host.stdout.read().splitlines()]
    assert host.wait(30) == 0
    assert replies[0] == {"ready": True}
    assert replies[1]["exit"] == 1 and replies[1]["reason"] == "ValueError: row 3"
    assert replies[2]["exit"] == 0
    assert "ValueError: row 3" in (tmp_path / "log-0.txt").read_text()


def test_a_hangup_host_ends_mid_shard_with_what_it_started(tmp_path: Path) -> None:
    (tmp_path / "task.py").write_text(
        "import subprocess, time\n"
        "def run(shard):\n"
        "    child = subprocess.Popen(['sleep', '3171'])\n"
        "    open(shard.output_dir / 'child.pid', 'w').write(str(child.pid))\n"
        "    time.sleep(600)\n"
    )
    host = _host(sys.executable, tmp_path, "--hangup")
    assert host.stdin is not None and host.stdout is not None
    assert json.loads(host.stdout.readline()) == {"ready": True}
    host.stdin.write(_request(tmp_path, 0))
    host.stdin.flush()
    deadline = time.monotonic() + 20
    while not (tmp_path / "child.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int((tmp_path / "child.pid").read_text())
    host.stdin.close()  # the worker is gone, in the middle of the shard (a 600 s one)
    assert host.wait(60) == 1  # ended by the hangup, not by the shard's end
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed (and, as the host's own child, reaped)


def _spare(tmp_path: Path, modules: dict[str, str], preload: str, run: str) -> Any:
    """A spare host (``--preload=PRELOAD --spare``) with ``modules`` (name: source) on its
    import path and a task whose ``run`` body is ``run``; the host, its task's first line, and
    a function that sends it with one shard and returns the replies and what it wrote to fd 2."""
    lib, task = tmp_path / "lib", tmp_path / "task"
    lib.mkdir()
    task.mkdir()
    for name, source in modules.items():
        (lib / f"{name}.py").write_text(source)
    (task / "task.py").write_text(f"import sys\n\ndef run(shard):\n    {run}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(lib)])}
    host = subprocess.Popen(
        [sys.executable, "-m", "worker.executors.host", f"--preload={preload}", "--spare"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def give() -> tuple[list[dict[str, Any]], bytes]:
        assert host.stdin is not None and host.stdout is not None and host.stderr is not None
        load = {"task": str(task), "path": [str(task)], "env": env}
        host.stdin.write(json.dumps(load).encode() + b"\n" + _request(tmp_path, 0))
        host.stdin.close()
        replies = [json.loads(line) for line in host.stdout.read().splitlines()]
        assert host.wait(30) == 0
        return replies, host.stderr.read()

    return host, give


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_spare_imports_its_preload_before_its_task_and_keeps_its_replies_clean(
    tmp_path: Path,
) -> None:
    """``--preload`` modules are imported while the spare waits for its task: one that prints
    as it is imported writes to fd 2, not into the replies' pipe, and one that cannot be
    imported is left to the task (the host still serves it)."""
    imported = tmp_path / "imported"
    noisy = (
        "import os, sys\nprint('loud at import')\nsys.stdout.flush()\n"
        f"open({str(imported)!r}, 'w').write(str(os.getpid()))\n"
    )
    host, give = _spare(
        tmp_path, {"noisy": noisy}, "nowhere,noisy", "assert 'noisy' in sys.modules"
    )
    _wait_for(imported)
    assert imported.read_text() == str(host.pid)  # before any task was given
    replies, stderr = give()
    assert replies == [{"ready": True}, {"id": 0, "exit": 0, "reason": None, "recycle": False}]
    assert b"loud at import" in stderr


def test_a_spare_given_its_task_begins_no_further_preload(tmp_path: Path) -> None:
    """The preload is the last map's function's: once the task has come, the modules not yet
    begun are left to it (this map's function may need none of them)."""
    started = tmp_path / "started"
    slow = f"import time\nopen({str(started)!r}, 'w')\ntime.sleep(0.5)\n"
    _, give = _spare(
        tmp_path, {"slow": slow, "later": ""}, "slow,later", "assert 'later' not in sys.modules"
    )
    _wait_for(started)
    replies, _ = give()
    assert replies[1]["exit"] == 0, (tmp_path / "log-0.txt").read_text()
