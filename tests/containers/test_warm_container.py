"""A warm container per slot for ``task.py`` on a real engine: the attempt promises hold."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.bundle import UnpackedBundle
from worker.executors.base import RunningTask, task_cwd
from worker.executors.container.executor import ContainerExecutor
from worker.executors.container.runtime import Runtime
from worker.protocol import Entry
from worker.taskapi import TaskShard

# One per test process: containers and processes are told apart by it when test files run
# side by side.
RUN_ID = f"r20260101-000000-w{secrets.token_hex(3)}"

# Every host imports this once: HOST names the process (a fresh container gets a new one).
TASK = """
import json, os, secrets, signal, subprocess, sys, time
from pathlib import Path

HOST = secrets.token_hex(4)

def run(shard):
    mode = shard.params.get("mode")
    out = Path(shard.output_dir)
    info = {"host": HOST, "exe": sys.executable, "version": sys.version_info[:2],
            "env": {k: v for k, v in os.environ.items() if k.startswith("CFLOW_")},
            "cwd": os.getcwd()}
    if shard.input:
        info["input"] = Path(shard.input).read_text()
    for target in [shard.input or "/cflow-none", "/task/evil", "/evil", "/opt/cflow/worker/x.py"]:
        try:
            Path(target).write_text("x")
            info.setdefault("wrote", []).append(target)
        except OSError:
            pass
    (out / "info.json").write_text(json.dumps(info))
    if mode == "exit":
        os._exit(3)
    if mode == "hang":
        time.sleep(3600)
    if mode == "orphaned":
        subprocess.Popen(["sleep", "3153"])
        time.sleep(3600)
    if mode == "term":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(5))
        time.sleep(3600)
    if mode == "leave":
        subprocess.Popen(["sleep", "3151"])
        subprocess.Popen(["sh", "-c", "setsid sleep 3152 &"]).wait()
"""


@pytest.fixture
def executor(
    container_runtime: Runtime, python_image: str, tmp_path: Path
) -> Iterator[ContainerExecutor]:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "task.py").write_text(textwrap.dedent(TASK).lstrip())
    made = ContainerExecutor(
        UnpackedBundle("0" * 64, root, None), Entry.PYTHON, python_image, runtime=container_runtime
    )
    yield made
    made.close()
    for leftover in _containers(container_runtime):  # a failed test's, so the next one is clean
        container_runtime.remove(leftover)


def _shard(tmp_path: Path, n: int, mode: str = "", input_path: Path | None = None) -> TaskShard:
    return TaskShard(
        run_id=RUN_ID,
        id=f"s{n}",
        index=n,
        attempt=1,
        input=str(input_path) if input_path else None,
        output_dir=tmp_path / "slot" / f"out-{n}",
        params={"mode": mode},
    )


def _start(executor: ContainerExecutor, tmp_path: Path, shard: TaskShard) -> RunningTask:
    (tmp_path / "slot").mkdir(exist_ok=True)
    return executor.start(shard, tmp_path / "slot" / f"log-{shard.index}.txt")


def _info(shard: TaskShard) -> dict[str, object]:
    info: dict[str, object] = json.loads((shard.output_dir / "info.json").read_text())
    return info


def _containers(runtime: Runtime) -> list[str]:
    proc = runtime.call("ps", "--all", "--quiet", "--filter", f"label=cflow.run={RUN_ID}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _host_processes(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def _gone(check: object, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not check():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def test_shards_run_one_after_another_in_one_container(
    executor: ContainerExecutor, container_runtime: Runtime, tmp_path: Path
) -> None:
    data = tmp_path / "in" / "rows.csv"
    data.parent.mkdir()
    data.write_text("a,b\n")
    (tmp_path / "secret.txt").write_text("not mounted")
    shards = [_shard(tmp_path, n, input_path=data) for n in range(3)]
    tasks = [_start(executor, tmp_path, s) for s in shards]  # pipelined, as the agent does
    assert [t.wait(60) for t in tasks] == [0, 0, 0]
    infos = [_info(s) for s in shards]
    assert len({i["host"] for i in infos}) == 1  # one process: task.py imported once
    assert len(_containers(container_runtime)) == 1
    first = infos[0]
    assert first["exe"] == "/usr/bin/python3"  # the image's
    assert first["cwd"] == str(task_cwd(shards[0]))  # the attempt's own working folder
    assert first["input"] == "a,b\n" and "wrote" not in first  # read-only all but out
    env = first["env"]
    assert isinstance(env, dict)
    expected = shards[0].env()  # the same variables and paths as outside the container
    assert {k: env[k] for k in expected} == expected
    assert env["CFLOW_ATTEMPT_TOKEN"]
    assert data.read_text() == "a,b\n"
    executor.close()
    assert _gone(lambda: _containers(container_runtime))


def test_a_folder_the_container_lacks_gets_a_fresh_one_that_mounts_it(
    executor: ContainerExecutor, tmp_path: Path
) -> None:
    inputs = []
    for name in ("a", "b"):
        path = tmp_path / name / "in.txt"
        path.parent.mkdir()
        path.write_text(name)
        inputs.append(path)
    shards = [_shard(tmp_path, n, input_path=p) for n, p in enumerate([*inputs, inputs[0]])]
    for shard in shards:
        assert _start(executor, tmp_path, shard).wait(60) == 0
    infos = [_info(s) for s in shards]
    assert [i["input"] for i in infos] == ["a", "b", "a"]
    hosts = [i["host"] for i in infos]
    assert hosts[0] != hosts[1] == hosts[2]  # the second container mounts both folders


def test_a_timeout_stops_only_that_attempt_and_a_fresh_container_follows(
    executor: ContainerExecutor, container_runtime: Runtime, tmp_path: Path
) -> None:
    first = _start(executor, tmp_path, _shard(tmp_path, 0))
    assert first.wait(60) == 0
    hung = _start(executor, tmp_path, _shard(tmp_path, 1, "hang"))
    queued = _start(executor, tmp_path, _shard(tmp_path, 2))
    assert hung.wait(2.0) is None
    assert hung.stop(grace=1.0) == -signal.SIGTERM  # the host had no handler: TERM ends it
    assert queued.wait(10) is not None and getattr(queued, "not_started", False)
    again = _start(executor, tmp_path, _shard(tmp_path, 2))  # the agent sends it again
    assert again.wait(60) == 0
    hosts = [_info(_shard(tmp_path, n))["host"] for n in range(3)]
    assert hosts[0] == hosts[1] != hosts[2]
    assert len(_containers(container_runtime)) == 1


def test_a_task_that_handles_sigterm_ends_its_attempt_and_keeps_the_container(
    executor: ContainerExecutor, tmp_path: Path
) -> None:
    task = _start(executor, tmp_path, _shard(tmp_path, 0, "term"))
    assert task.wait(2.0) is None
    assert task.stop(grace=5.0) == 5
    assert _start(executor, tmp_path, _shard(tmp_path, 1)).wait(60) == 0
    assert _info(_shard(tmp_path, 0))["host"] == _info(_shard(tmp_path, 1))["host"]


def test_os_exit_fails_only_its_attempt_and_the_next_shard_gets_a_fresh_container(
    executor: ContainerExecutor, tmp_path: Path
) -> None:
    crashed = _start(executor, tmp_path, _shard(tmp_path, 0, "exit"))
    behind = _start(executor, tmp_path, _shard(tmp_path, 1))
    assert crashed.wait(60) == 3
    assert "exited with code 3 mid-shard" in (tmp_path / "slot" / "log-0.txt").read_text()
    assert behind.wait(10) is not None and getattr(behind, "not_started", False)
    assert _start(executor, tmp_path, _shard(tmp_path, 1)).wait(60) == 0
    assert _info(_shard(tmp_path, 0))["host"] != _info(_shard(tmp_path, 1))["host"]


def test_every_process_of_a_shard_is_gone_when_it_ends(
    executor: ContainerExecutor, tmp_path: Path
) -> None:
    assert _start(executor, tmp_path, _shard(tmp_path, 0, "leave")).wait(60) == 0
    assert _host_processes("sleep 315[12]") == []  # the plain child and the setsid daemon
    assert _start(executor, tmp_path, _shard(tmp_path, 1)).wait(60) == 0
    assert _info(_shard(tmp_path, 0))["host"] == _info(_shard(tmp_path, 1))["host"]


def test_a_task_that_does_not_import_gets_a_container_per_attempt_that_shows_why(
    container_runtime: Runtime, python_image: str, tmp_path: Path
) -> None:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / "task.py").write_text("import no_such_module_here\n")
    executor = ContainerExecutor(
        UnpackedBundle("0" * 64, root, None), Entry.PYTHON, python_image, runtime=container_runtime
    )
    try:
        # Its warm container's host said the task would not load: the shard never started
        # there (the agent starts it again), and from then on each attempt has a container of
        # its own that says why.
        refused = _start(executor, tmp_path, _shard(tmp_path, 0))
        assert refused.wait(60) != 0 and getattr(refused, "not_started", False)
        for n in range(2):
            task = _start(executor, tmp_path, _shard(tmp_path, n))
            assert task.wait(60) == 1
            log = (tmp_path / "slot" / f"log-{n}.txt").read_text()
            assert "No module named 'no_such_module_here'" in log
        assert not executor.queues
    finally:
        executor.close()
    assert _gone(lambda: _containers(container_runtime))


WORKER_SCRIPT = """
import sys, time
from pathlib import Path
from worker.bundle import UnpackedBundle
from worker.executors.container.executor import ContainerExecutor
from worker.executors.container.runtime import detect_runtime
from worker.protocol import Entry
from worker.taskapi import TaskShard

root, image, engine, run_id = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
executor = ContainerExecutor(UnpackedBundle("0" * 64, root, None), Entry.PYTHON, image,
                             runtime=detect_runtime(engine))
slot = root.parent / "slot"
slot.mkdir()
shard = TaskShard(run_id, "s", 0, 1, None, slot / "out", {"mode": "orphaned"})
executor.start(shard, slot / "log.txt")
deadline = time.monotonic() + 60
while not (slot / "out" / "info.json").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print("started" if (slot / "out" / "info.json").exists() else "not started", flush=True)
time.sleep(120)
"""


def test_a_sigkilled_worker_leaves_no_warm_container_running(
    executor: ContainerExecutor, container_runtime: Runtime, python_image: str, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    argv = [sys.executable, "-c", WORKER_SCRIPT, str(executor.bundle.root), python_image]
    worker = subprocess.Popen(
        [*argv, container_runtime.name, RUN_ID], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == "started"
        assert len(_containers(container_runtime)) == 1
    finally:
        worker.kill()  # SIGKILL: no cleanup runs in the worker
        worker.wait()
    assert _gone(lambda: _containers(container_runtime), 10.0)  # the host saw the hangup
    assert _gone(lambda: _host_processes("sleep 3153"), 10.0)  # the shard's child went too
    # The engine's client (its command line has the run's label) exits once it is removed.
    assert _gone(lambda: _host_processes(f"cflow.run={RUN_ID}"), 10.0)
