"""Task processes: exit codes, logs, crashes, process groups, for both entry points."""

from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import pytest

from worker.bundle import UnpackedBundle
from worker.executor import Executor
from worker.protocol import Entry
from worker.taskapi import TaskShard


def _bundle(tmp_path: Path, name: str, body: str) -> UnpackedBundle:
    root = tmp_path / "task"
    root.mkdir(exist_ok=True)
    (root / name).write_text(textwrap.dedent(body).lstrip())
    return UnpackedBundle("0" * 64, root, None)


def _shard(tmp_path: Path, index: int = 0, **params: object) -> TaskShard:
    return TaskShard(
        run_id="r-x",
        id=f"s{index}",
        index=index,
        attempt=1,
        input=None,
        output_dir=tmp_path / f"out{index}",
        params=dict(params),
    )


PY_TASK = """
import os, sys, time
from pathlib import Path
print("imported once", os.getpid(), file=sys.stderr)

def run(shard):
    mode = shard.params.get("mode")
    print("run", shard.id, os.environ["CFLOW_SHARD_ID"], shard.params)
    if mode == "raise":
        raise ValueError("bad record")
    if mode == "exit":
        sys.exit(4)
    if mode == "segv":
        os.kill(os.getpid(), 11)
    if mode == "sleep":
        time.sleep(60)
    (Path(shard.output_dir) / "ok.txt").write_text("ok")
"""


@pytest.mark.parametrize("fork", [True, False])
def test_python_task_outcomes(tmp_path: Path, fork: bool) -> None:
    executor = Executor(_bundle(tmp_path, "task.py", PY_TASK), Entry.PYTHON, fork=fork)
    try:
        cases = [("ok", 0), ("raise", 1), ("exit", 4), ("segv", -11)]
        for i, (mode, expected) in enumerate(cases):
            log = tmp_path / f"log{i}.txt"
            task = executor.start(_shard(tmp_path, i, mode=mode), log)
            assert task.wait(30) == expected, log.read_text()
        assert (tmp_path / "out0" / "ok.txt").read_text() == "ok"
        assert "run s0 s0 {'mode': 'ok'}" in (tmp_path / "log0.txt").read_text()
        assert "ValueError: bad record" in (tmp_path / "log1.txt").read_text()
        # after a segfault the next shard still runs: a crash never takes the host down
        task = executor.start(_shard(tmp_path, 9, mode="ok"), tmp_path / "log9.txt")
        assert task.wait(30) == 0
    finally:
        executor.close()


def test_fork_mode_imports_the_task_once(tmp_path: Path) -> None:
    body = PY_TASK.replace(
        'print("imported once"', 'open(os.environ["MARK"], "a").write("x"); print("imported once"'
    )
    os.environ["MARK"] = str(tmp_path / "imports.txt")
    try:
        executor = Executor(_bundle(tmp_path, "task.py", body), Entry.PYTHON, fork=True)
        for i in range(5):
            assert executor.start(_shard(tmp_path, i), tmp_path / f"l{i}").wait(30) == 0
        executor.close()
    finally:
        del os.environ["MARK"]
    assert (tmp_path / "imports.txt").read_text() == "x"


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    bundle = _bundle(
        tmp_path,
        "task.sh",
        """
        sleep 300 &
        echo $! > "$CFLOW_OUTPUT_DIR/child.pid"
        wait
    """,
    )
    executor = Executor(bundle, Entry.SHELL)
    task = executor.start(_shard(tmp_path), tmp_path / "log.txt")
    pid_file = tmp_path / "out0" / "child.pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() or not pid_file.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child = int(pid_file.read_text())
    assert task.wait(0.2) is None
    code = task.stop(grace=2)
    assert code == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while True:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "the task's child survived"
        time.sleep(0.02)


def test_shell_task_sees_the_documented_environment(tmp_path: Path) -> None:
    bundle = _bundle(
        tmp_path,
        "task.sh",
        """
        env | grep '^CFLOW_' | sort > "$CFLOW_OUTPUT_DIR/env.txt"
    """,
    )
    shard = TaskShard(
        run_id="r-env",
        id="s7",
        index=7,
        attempt=2,
        input="/data/x.csv",
        output_dir=tmp_path / "o",
        params={"k": 1},
    )
    assert Executor(bundle, Entry.SHELL).start(shard, tmp_path / "log").wait(10) == 0
    env = dict(line.split("=", 1) for line in (tmp_path / "o" / "env.txt").read_text().splitlines())
    assert env["CFLOW_RUN_ID"] == "r-env" and env["CFLOW_SHARD_ID"] == "s7"
    assert env["CFLOW_ATTEMPT"] == "2" and env["CFLOW_INPUT"] == "/data/x.csv"
    assert env["CFLOW_OUTPUT_DIR"] == str(tmp_path / "o") and env["CFLOW_PARAMS"] == '{"k": 1}'


def test_a_task_that_fails_to_import_fails_each_attempt_with_its_traceback(tmp_path: Path) -> None:
    executor = Executor(
        _bundle(tmp_path, "task.py", "import no_such_module\ndef run(s): pass\n"), Entry.PYTHON
    )
    task = executor.start(_shard(tmp_path), tmp_path / "log.txt")
    assert task.wait(30) == 1
    assert "No module named 'no_such_module'" in (tmp_path / "log.txt").read_text()
