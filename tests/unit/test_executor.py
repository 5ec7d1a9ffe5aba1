"""Task processes: exit codes, logs, crashes, process groups, for both entry points."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.bundle import UnpackedBundle
from worker.executors import reaper
from worker.executors.process import Executor
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


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolate"])
def test_python_task_outcomes(tmp_path: Path, isolate: bool) -> None:
    executor = Executor(_bundle(tmp_path, "task.py", PY_TASK), Entry.PYTHON, isolate=isolate)
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


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolate"])
def test_the_task_is_imported_once(tmp_path: Path, isolate: bool) -> None:
    body = PY_TASK.replace(
        'print("imported once"', 'open(os.environ["MARK"], "a").write("x"); print("imported once"'
    )
    os.environ["MARK"] = str(tmp_path / "imports.txt")
    try:
        executor = Executor(_bundle(tmp_path, "task.py", body), Entry.PYTHON, isolate=isolate)
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
    # Its warm host said the task would not load: the shard never started there (the agent
    # starts it again), and from then on each attempt is a process of its own that says why.
    assert task.wait(30) != 0 and getattr(task, "not_started", False)
    task = executor.start(_shard(tmp_path), tmp_path / "log.txt")
    assert task.wait(30) == 1
    assert "No module named 'no_such_module'" in (tmp_path / "log.txt").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead, just not yet reaped by whoever it was reparented to
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


LEAVES_CHILDREN = """
import os, subprocess, sys
from pathlib import Path

def run(shard):
    out = Path(shard.output_dir)
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    daemon = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    # a double fork whose middle process exits: the grandchild is orphaned at once
    middle = subprocess.Popen(
        ["bash", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo $! > " + str(out / "orphan")]
    )
    middle.wait()
    (out / "pids").write_text(f"{plain.pid} {daemon.pid}")
"""


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolate"])
def test_every_process_a_python_attempt_started_is_gone_when_it_returns(
    tmp_path: Path, isolate: bool
) -> None:
    bundle = _bundle(tmp_path, "task.py", LEAVES_CHILDREN)
    executor = Executor(bundle, Entry.PYTHON, isolate=isolate)
    try:
        shard = _shard(tmp_path)
        assert executor.start(shard, tmp_path / "log").wait(30) == 0, (tmp_path / "log").read_text()
        pids = [int(p) for p in (shard.output_dir / "pids").read_text().split()]
        pids.append(int((shard.output_dir / "orphan").read_text()))
        for pid in pids:
            assert _gone(pid), f"process {pid} outlived its attempt"
        # and the warm host is still there for the next shard
        assert executor.start(_shard(tmp_path, 1), tmp_path / "log1").wait(30) == 0
    finally:
        executor.close()


@pytest.fixture
def subreaper() -> Iterator[None]:
    """This test process stands in for the worker, which is a child subreaper (Agent.run)."""
    reaper.become_subreaper()
    try:
        yield
    finally:
        reaper.become_subreaper(False)  # the rest of the session's orphans go to init again


@pytest.mark.usefixtures("subreaper")
def test_every_process_a_shell_attempt_started_is_gone_when_it_exits(tmp_path: Path) -> None:
    bundle = _bundle(
        tmp_path,
        "task.sh",
        """
        sleep 300 &
        echo $! > "$CFLOW_OUTPUT_DIR/plain"
        setsid sleep 300 >/dev/null 2>&1 &
        echo $! > "$CFLOW_OUTPUT_DIR/escaped"
        exit 0
    """,
    )
    shard = _shard(tmp_path)
    assert Executor(bundle, Entry.SHELL).start(shard, tmp_path / "log").wait(10) == 0
    for name in ("plain", "escaped"):
        pid = int((shard.output_dir / name).read_text())
        assert _gone(pid), f"the {name} child outlived its attempt"


@pytest.mark.usefixtures("subreaper")
def test_the_sweep_looks_again_at_an_orphan_caught_mid_exec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process inside ``execve`` reads with an empty environment for a moment (a
    ``setsid cmd &`` whose shell just exited): the sweep must not take it for token-less."""
    orphan = subprocess.Popen(
        ["sleep", "300"], env={**os.environ, reaper.TOKEN_VAR: "ended"}, start_new_session=True
    )
    reads = {"n": 0}
    real = reaper.token_of

    def mid_exec(pid: int) -> str | None:
        if pid == orphan.pid and reads["n"] < 3:
            reads["n"] += 1
            return ""  # what /proc/<pid>/environ gives during execve
        return real(pid)

    monkeypatch.setattr(reaper, "token_of", mid_exec)
    killed = reaper.sweep_orphans(os.getpid(), live_tokens=(), known=())
    assert killed == 1 and reads["n"] == 3
    assert _gone(orphan.pid)  # killed, and reaped by the sweep
    orphan.wait(5)


def test_a_task_may_close_its_streams(tmp_path: Path) -> None:
    body = """
    import sys
    def run(shard):
        print("before")
        sys.stdout.close()
        sys.stderr.close()
    """
    executor = Executor(_bundle(tmp_path, "task.py", body), Entry.PYTHON)
    try:
        for i in range(2):  # and the next shard in the same process still gets its log
            log = tmp_path / f"log{i}"
            assert executor.start(_shard(tmp_path, i), log).wait(30) == 0
            assert log.read_text() == "before\n"
    finally:
        executor.close()


def test_a_warm_process_keeps_module_state_and_reports_the_error_line(tmp_path: Path) -> None:
    body = """
    import os
    SEEN = []
    def run(shard):
        SEEN.append(shard.id)
        if shard.params.get("mode") == "crash":
            os._exit(3)
        if shard.params.get("mode") == "raise":
            raise KeyError("missing column 'price'")
        print(len(SEEN), os.getpid())
    """
    executor = Executor(_bundle(tmp_path, "task.py", body), Entry.PYTHON)
    try:
        assert executor.start(_shard(tmp_path, 0), tmp_path / "l0").wait(30) == 0
        assert executor.start(_shard(tmp_path, 1), tmp_path / "l1").wait(30) == 0
        first, second = ((tmp_path / n).read_text().split() for n in ("l0", "l1"))
        assert (first[0], second[0]) == ("1", "2") and first[1] == second[1]  # one process
        failed = executor.start(_shard(tmp_path, 2, mode="raise"), tmp_path / "l2")
        assert failed.wait(30) == 1
        assert failed.reason == "KeyError: \"missing column 'price'\""
        crashed = executor.start(_shard(tmp_path, 3, mode="crash"), tmp_path / "l3")
        assert crashed.wait(30) == 3  # os._exit takes down only its own process
        after = executor.start(_shard(tmp_path, 4), tmp_path / "l4")
        assert after.wait(30) == 0
        count, pid = (tmp_path / "l4").read_text().split()
        assert count == "1" and pid != first[1]  # a fresh process replaced it
    finally:
        executor.close()


def test_shards_queued_on_a_host_that_died_unseen_are_settled_when_a_new_host_starts(
    tmp_path: Path,
) -> None:
    """A host that crashed is first noticed by a poll (when the next shard starts), not by its
    own shards' waits: they must still get their replies, and never wait on the closed pipe,
    whose descriptor the new host's pipe may reuse."""
    bundle = _bundle(
        tmp_path,
        "task.py",
        """
        import os, time

        def run(shard):
            if shard.index == 1:
                while not os.path.exists(shard.params["crash"]):
                    time.sleep(0.01)
                os._exit(3)
        """,
    )
    crash = tmp_path / "crash"
    executor = Executor(bundle, Entry.PYTHON)
    try:
        queued = [
            executor.start(_shard(tmp_path, i, crash=str(crash)), tmp_path / f"log{i}")
            for i in range(3)
        ]
        pid = queued[0].pid
        assert pid is not None and {task.pid for task in queued} == {pid}  # all on one host
        crash.touch()  # only now, with all three queued on it, does the host die under shard 1
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # it exited; the executor reaps it
        later = executor.start(_shard(tmp_path, 3), tmp_path / "log3")  # a new host
        assert later.pid != pid
        codes = [task.wait(10) for task in queued]
        assert codes[0] == 0  # its reply was in the pipe when the host was closed
        assert codes[1] == 3 and not queued[1].not_started  # it died under this one
        assert queued[2].not_started  # never reached: it runs again, it does not fail
        assert later.wait(10) == 0
    finally:
        executor.close()


def test_an_attempts_working_folder_is_kept_only_while_as_it_was_made(tmp_path: Path) -> None:
    """A short shard's attempt makes and removes no folder: an empty working folder, as the
    worker made it, is kept for the next attempt in the same place. Anything left in it, any
    mode the task set (taken away, or given to all: never passed on to the next task), or a
    link, file or fifo put in its place, and the next attempt gets a new empty folder (a
    link's target untouched)."""
    from worker.executors.base import clear_cwd, fresh_cwd

    shard = TaskShard(
        run_id="r", id="s", index=0, attempt=1, input=None, output_dir=tmp_path / "out-0"
    )
    cwd = fresh_cwd(shard)
    assert cwd.is_dir() and not any(cwd.iterdir())
    made = cwd.stat().st_ino
    clear_cwd(shard)
    assert fresh_cwd(shard).stat().st_ino == made  # kept, and used again

    (cwd / "model.bin").write_bytes(b"left by a task")
    clear_cwd(shard)
    assert not cwd.exists()  # anything left: the folder goes whole
    assert not any(fresh_cwd(shard).iterdir())

    cwd.chmod(0o500)  # empty, but the next task could not write in it
    again = fresh_cwd(shard)
    assert again.stat().st_mode & 0o700 == 0o700 and not any(again.iterdir())
    mode = again.stat().st_mode
    for taken in (0o777, 0o2700):  # world-writable, set-group-id: never passed on
        again.chmod(taken)
        clear_cwd(shard)
        again = fresh_cwd(shard)
        assert again.stat().st_mode == mode and not any(again.iterdir())

    for put in (lambda p: p.write_text("a file"), os.mkfifo):  # in the folder's place
        again.rmdir()
        put(again)
        clear_cwd(shard)
        again = fresh_cwd(shard)
        assert again.is_dir() and not any(again.iterdir())

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the worker's")
    cwd.rmdir()
    cwd.symlink_to(elsewhere)  # a task that put a link in its folder's place
    clear_cwd(shard)
    fresh = fresh_cwd(shard)
    assert not fresh.is_symlink() and fresh.is_dir() and not any(fresh.iterdir())
    assert (elsewhere / "keep.txt").read_text() == "not the worker's"


RETURNING_TASK = """
from pathlib import Path

def run(shard):
    if shard.params.get("also_file"):  # a task's own file of that name is no output
        (Path(shard.output_dir) / ".cflow-return.json").write_text("not json")
    return {"id": shard.id, "n": [1, 2.5, "x"]}
"""


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolate"])
def test_a_return_value_comes_back_whole_and_never_as_an_output(
    tmp_path: Path, isolate: bool
) -> None:
    """A warm host sends what run(shard) returned in its reply (no file made and removed a
    shard); an isolated attempt's process leaves it in the output folder. Either way the
    worker takes the same value, and no file of that name is left to be sealed."""
    from worker.agent.files import list_files, take_return

    bundle = _bundle(tmp_path, "task.py", RETURNING_TASK)
    executor = Executor(bundle, Entry.PYTHON, isolate=isolate)
    try:
        for i, also_file in enumerate([False, True]):
            shard = _shard(tmp_path, i, also_file=also_file)
            task = executor.start(shard, tmp_path / f"log{i}.txt")
            assert task.wait(30) == 0, (tmp_path / f"log{i}.txt").read_text()
            if not isolate:
                assert task.returned is not None  # by the reply
                if not also_file:
                    assert not list_files(shard.output_dir)  # and no file at all
            returned = take_return(shard.output_dir, task.returned)
            assert returned == {"id": f"s{i}", "n": [1, 2.5, "x"]}
            assert list_files(shard.output_dir) == []
    finally:
        executor.close()
