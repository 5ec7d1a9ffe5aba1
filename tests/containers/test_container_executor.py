"""ContainerExecutor on a real engine with locally built images: the attempt promises hold."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import worker.executors.container.gpus as container_gpus_module
from worker.bundle import UnpackedBundle
from worker.executors.base import RunningTask
from worker.executors.container.executor import ContainerExecutor
from worker.executors.container.runtime import ImagePullError, Runtime
from worker.protocol import Entry
from worker.taskapi import TaskShard


def _bundle(tmp_path: Path, name: str, body: str) -> UnpackedBundle:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / name).write_text(textwrap.dedent(body).lstrip())
    return UnpackedBundle("0" * 64, root, None)


def _run_id() -> str:
    """A run of its own: its containers' label is this test's alone on a shared engine."""
    return f"r20260101-000000-{secrets.token_hex(3)}"


def _shard(tmp_path: Path, input_path: Path | None = None, attempt: int = 1) -> TaskShard:
    return TaskShard(
        run_id=_run_id(),
        id="shard-1",
        index=4,
        attempt=attempt,
        input=str(input_path) if input_path else None,
        output_dir=tmp_path / "attempt" / "out",
        params={"k": "v"},
    )


def _containers(runtime: Runtime, run_id: str) -> list[str]:
    proc = runtime.call("ps", "--all", "--quiet", "--filter", f"label=cflow.run={run_id}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _nap(seconds: int) -> str:
    """A sleep this test process alone runs, to look for on the host by its command line."""
    return f"sleep {seconds}.{os.getpid()}"


def _host_processes(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return found.stdout.split()


def test_shell_task_sees_its_shard_and_writes_only_its_outputs(
    container_runtime: Runtime, shell_image: str, tmp_path: Path
) -> None:
    data = tmp_path / "data: odd, name.csv"  # ':' and ',' split engine mount options
    data.write_text("a,b\n1,2\n")
    bundle = _bundle(
        tmp_path,
        "task.sh",
        """
        echo "run=$CFLOW_RUN_ID shard=$CFLOW_SHARD_ID index=$CFLOW_SHARD_INDEX try=$CFLOW_ATTEMPT"
        echo "params=$CFLOW_PARAMS input=$CFLOW_INPUT out=$CFLOW_OUTPUT_DIR"
        wc -l < "$CFLOW_INPUT" > "$CFLOW_OUTPUT_DIR/lines.txt"
        for target in /task/evil "$CFLOW_INPUT" /cflow/evil /evil /opt/cflow/worker/evil.py; do
            if echo x > "$target" 2>/dev/null; then echo "WROTE $target"; fi
        done
        echo scratch > /tmp/scratch && echo "tmp ok"
        exit 3
        """,
    )
    shard = _shard(tmp_path, data)
    executor = ContainerExecutor(bundle, Entry.SHELL, shell_image, runtime=container_runtime)
    log = tmp_path / "log.txt"
    task = executor.start(shard, log)
    assert task.wait(60) == 3
    text = log.read_text()
    assert f"run={shard.run_id} shard=shard-1 index=4 try=1" in text
    assert 'params={"k": "v"} input=/cflow/input/data-odd-name.csv out=/cflow/out' in text
    assert "WROTE" not in text and "tmp ok" in text
    assert (shard.output_dir / "lines.txt").read_text().strip() == "2"
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        ["data: odd, name.csv", "task.sh", "log.txt", "lines.txt"]
    )
    assert data.read_text() == "a,b\n1,2\n"
    assert _containers(container_runtime, shard.run_id) == []


def test_an_isolated_python_task_runs_in_a_container_of_its_own(
    container_runtime: Runtime, python_image: str, tmp_path: Path
) -> None:
    bundle = _bundle(
        tmp_path,
        "task.py",
        """
        import json, sys
        from pathlib import Path

        def run(shard):
            info = {"exe": sys.executable, "version": sys.version, "params": shard.params,
                    "out": str(shard.output_dir), "attempt": shard.attempt}
            (Path(shard.output_dir) / "info.json").write_text(json.dumps(info))
        """,
    )
    shard = _shard(tmp_path, attempt=2)
    executor = ContainerExecutor(
        bundle, Entry.PYTHON, python_image, runtime=container_runtime, isolate=True
    )
    task = executor.start(shard, tmp_path / "log.txt")
    assert task.wait(60) == 0, (tmp_path / "log.txt").read_text()
    assert _containers(container_runtime, shard.run_id) == []  # gone with its attempt
    info = (shard.output_dir / "info.json").read_text()
    assert '"exe": "/usr/bin/python3"' in info  # Debian's, not this machine's pyenv
    assert '"out": "/cflow/out"' in info and '"attempt": 2' in info
    assert '"params": {"k": "v"}' in info


def test_a_failing_python_task_logs_its_traceback(
    container_runtime: Runtime, python_image: str, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, "task.py", "def run(shard):\n    raise ValueError('bad row 7')\n")
    executor = ContainerExecutor(bundle, Entry.PYTHON, python_image, runtime=container_runtime)
    try:
        task = executor.start(_shard(tmp_path), tmp_path / "log.txt")
        assert task.wait(60) == 1
        assert task.reason == "ValueError: bad row 7"  # the warm host's own account
        assert "ValueError: bad row 7" in (tmp_path / "log.txt").read_text()
    finally:
        executor.close()


def test_background_processes_end_with_the_attempt(
    container_runtime: Runtime, shell_image: str, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, "task.sh", f"{_nap(3117)} &\necho started\n")
    shard = _shard(tmp_path)
    executor = ContainerExecutor(bundle, Entry.SHELL, shell_image, runtime=container_runtime)
    task = executor.start(shard, tmp_path / "log.txt")
    assert task.wait(60) == 0
    assert "started" in (tmp_path / "log.txt").read_text()
    assert _host_processes(_nap(3117)) == []
    assert _containers(container_runtime, shard.run_id) == []


def _wait_for_line(log: Path, line: str, task: RunningTask) -> None:
    """Until the task's log has ``line`` (it is past its set-up); fails if the task ended."""
    deadline = time.monotonic() + 120
    while line not in (log.read_text() if log.exists() else "").splitlines():
        assert task.wait(0.05) is None, log.read_text() if log.exists() else "no log"
        assert time.monotonic() < deadline, f"the task never printed {line!r}"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("trap 'echo got TERM; exit 5' TERM\necho ready\nwhile :; do sleep 0.1; done\n", 5),
        (f"trap '' TERM\necho ready\n{_nap(3118)} & wait; {_nap(3118)}\n", -9),  # killed
    ],
    ids=["term-honoured", "term-ignored"],
)
def test_stop_terms_then_kills_and_removes_the_container(
    container_runtime: Runtime,
    shell_image: str,
    tmp_path: Path,
    script: str,
    expected: int,
) -> None:
    bundle = _bundle(tmp_path, "task.sh", script)
    shard = _shard(tmp_path)
    executor = ContainerExecutor(bundle, Entry.SHELL, shell_image, runtime=container_runtime)
    log = tmp_path / "log.txt"
    task = executor.start(shard, log)
    _wait_for_line(log, "ready", task)  # its TERM trap is set
    code = task.stop(grace=2.0)
    assert code == expected, log.read_text()
    assert _containers(container_runtime, shard.run_id) == []
    assert _host_processes(_nap(3118)) == []


def test_stop_right_after_start_leaves_no_container(
    container_runtime: Runtime, shell_image: str, tmp_path: Path
) -> None:
    """Stopped while the engine may still be making the container: once stop() returns, the
    engine's client and the container's monitor, the only ones that could still make or run
    it, are gone, and so is the container."""
    bundle = _bundle(tmp_path, "task.sh", f"{_nap(3119)}\n")
    shard = _shard(tmp_path)
    executor = ContainerExecutor(bundle, Entry.SHELL, shell_image, runtime=container_runtime)
    task = executor.start(shard, tmp_path / "log.txt")
    name = task.name  # type: ignore[attr-defined]  # the container's, on its command lines
    task.stop(grace=0.5)
    assert _host_processes(name) == []
    assert _containers(container_runtime, shard.run_id) == []
    assert _host_processes(_nap(3119)) == []


class _CountingRuntime(Runtime):
    """The real engine, counting the pulls it is asked for."""

    pulls: list[str]

    def call(
        self, *args: str, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("pull",):
            self.pulls.append(args[-1])
        return super().call(*args, timeout=timeout, input=input)


def test_a_missing_image_is_one_clear_error_pulled_once(
    container_runtime: Runtime, tmp_path: Path
) -> None:
    runtime = _CountingRuntime(
        container_runtime.name,
        container_runtime.binary,
        container_runtime.global_args,
        container_runtime.env,
        container_runtime.init_args,
    )
    object.__setattr__(runtime, "pulls", [])
    bundle = _bundle(tmp_path, "task.sh", "true\n")
    image = "localhost/cflow-test-missing:never"
    for _ in range(3):
        with pytest.raises(ImagePullError) as caught:
            ContainerExecutor(bundle, Entry.SHELL, image, runtime=runtime)
        message = str(caught.value)
        assert message.startswith(f"image {image} is not on this worker and cannot be pulled: ")
        assert "\n" not in message and caught.value.image == image
    assert runtime.pulls == [image]  # the failure is remembered, not retried per shard


def test_a_container_outlives_no_dead_worker_past_its_timeout(
    container_runtime: Runtime, shell_image: str, tmp_path: Path
) -> None:
    if container_runtime.name != "podman":
        pytest.skip("the backstop is podman's --timeout; docker has none")
    bundle = _bundle(tmp_path, "task.sh", f"{_nap(3120)}\n")
    shard = _shard(tmp_path)
    executor = ContainerExecutor(
        bundle, Entry.SHELL, shell_image, runtime=container_runtime, timeout=1, backstop=1
    )
    task = executor.start(shard, tmp_path / "log.txt")
    assert task.wait(1.0) is None
    assert task.pid is not None
    os.killpg(task.pid, signal.SIGKILL)  # the worker's side is gone, as if it was SIGKILLed
    deadline = time.monotonic() + 20
    while _host_processes(_nap(3120)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _host_processes(_nap(3120)) == []
    while _containers(container_runtime, shard.run_id) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _containers(container_runtime, shard.run_id) == []


WORKER_SCRIPT = """
import sys, time
from pathlib import Path
from worker.bundle import UnpackedBundle
from worker.executors.base import RunningTask
from worker.executors.container.executor import ContainerExecutor
from worker.executors.container.runtime import detect_runtime
from worker.protocol import Entry
from worker.taskapi import TaskShard

root, image, engine = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
executor = ContainerExecutor(UnpackedBundle("0" * 64, root, None), Entry.SHELL, image,
                             runtime=detect_runtime(engine))
shard = TaskShard(sys.argv[4], "s", 0, 1, None, root.parent / "out")
executor.start(shard, root.parent / "log.txt")
print("started", flush=True)
time.sleep(600)
"""

REAPER_SCRIPT = """
import sys
from worker.executors.container.executor import reap_orphans
from worker.executors.container.runtime import detect_runtime
print(" ".join(reap_orphans(detect_runtime(sys.argv[1]))))
"""


def test_the_next_worker_removes_what_a_killed_one_left(
    container_runtime: Runtime, shell_image: str, tmp_path: Path
) -> None:
    bundle = _bundle(tmp_path, "task.sh", f"{_nap(3121)}\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run_id = _run_id()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WORKER_SCRIPT,
            str(bundle.root),
            shell_image,
            container_runtime.name,
            run_id,
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None and worker.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 30
    while not _host_processes(_nap(3121)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_containers(container_runtime, run_id)) == 1
    worker.kill()  # SIGKILL: no cleanup runs in the worker
    worker.wait()
    assert len(_containers(container_runtime, run_id)) == 1  # left behind
    reaper = subprocess.run(
        [sys.executable, "-c", REAPER_SCRIPT, container_runtime.name],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert any(name.startswith(f"cflow-{run_id}-s-1-") for name in reaper.stdout.split())
    assert _containers(container_runtime, run_id) == []
    assert _host_processes(_nap(3121)) == []


def test_a_gpu_run_gives_every_container_the_machines_gpus(
    container_runtime: Runtime,
    python_image: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = tmp_path / "cdi" / "nvidia.yaml"  # what `nvidia-ctk cdi generate` writes
    spec.parent.mkdir()
    spec.write_text("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: all\n")
    monkeypatch.setattr(container_gpus_module, "CDI_SPEC_DIRS", (spec.parent,))
    # docker passes GPUs through the NVIDIA hook it runs: a machine with GPUs has it on PATH
    hook = tmp_path / "bin" / container_gpus_module.DOCKER_GPU_HOOK
    hook.parent.mkdir()
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o755)
    monkeypatch.setenv("PATH", f"{hook.parent}{os.pathsep}{os.environ['PATH']}")
    bundle = _bundle(tmp_path, "task.py", "def run(shard):\n    pass\n")
    wanted = list(container_runtime.gpu_args())
    for gpu in (True, False):
        executor = ContainerExecutor(
            bundle, Entry.PYTHON, python_image, runtime=container_runtime, gpu=gpu
        )
        per_attempt = executor.command(_shard(tmp_path), "cflow-gpu-test")
        warm = executor.spec.run_args("cflow-gpu-warm", {}, [], {}, interactive=True)
        for argv in (per_attempt, warm):
            flags = argv[: argv.index(python_image)]
            found = [flags[i : i + 2] for i in range(len(flags) - 1) if flags[i] == wanted[0]]
            assert found == ([wanted] if gpu else [])
