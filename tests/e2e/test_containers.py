"""Whole runs in container images through the CLI, with real workers and a real engine."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.containers.conftest import container_runtime, python_image, shell_image
from tests.e2e.conftest import REPO, Cli, make_inputs, make_task, wait_for
from worker.executors.container.gpus import DOCKER_GPU_HOOK, nvidia_cdi_specs
from worker.executors.container.runtime import Runtime

pytestmark = pytest.mark.e2e
__all__ = ["container_runtime", "python_image", "shell_image"]  # the session fixtures

COPY_TASK = """
import shutil, sys
from pathlib import Path

def run(shard):
    print("python", sys.executable, "input", shard.input)
    shutil.copyfile(shard.input, Path(shard.output_dir) / "rows.csv")
"""


@pytest.fixture(autouse=True)
def _workers_use_the_engine_under_test(cli: Cli, container_runtime: Runtime) -> None:
    cli.env["CFLOW_CONTAINER_RUNTIME"] = container_runtime.name


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def _containers(runtime: Runtime, run_id: str) -> list[str]:
    proc = runtime.call("ps", "--all", "--quiet", "--filter", f"label=cflow.run={run_id}")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def _host_processes(pattern: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()


def test_shell_task_in_a_container(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, shell_image: str
) -> None:
    inputs = make_inputs(tmp_path / "in", [f"f{i}.csv" for i in range(4)])
    result = cli(
        "submit",
        str(REPO / "examples" / "shell-task"),
        "--inputs",
        str(inputs / "*.csv"),
        "--workers",
        "2",
        "--image",
        shell_image,
    )
    assert result.code == 0, result.stderr
    counts = _rows(cli.store / "runs" / result.run_id / "combined" / "counts.csv")
    assert counts[0] == ["source", "records", "y_sum"]
    assert sorted(r[0] for r in counts[1:]) == [f"f{i}.csv" for i in range(4)]
    assert all(r[1] == "3" for r in counts[1:])
    manifest = json.loads((cli.store / "runs" / result.run_id / "run.json").read_text())
    assert manifest["options"]["image"] == shell_image
    assert _containers(container_runtime, result.run_id) == []


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolated"])
def test_python_task_in_a_container(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str, isolate: bool
) -> None:
    task = make_task(tmp_path / "t", COPY_TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    inputs = make_inputs(tmp_path / "in", [f"f{i}.csv" for i in range(3)])
    flags = ["--isolate"] if isolate else []
    result = cli(
        "submit", str(task), "--inputs", str(inputs / "*.csv"), "--image", python_image, *flags
    )
    assert result.code == 0, result.stderr
    combined = _rows(cli.store / "runs" / result.run_id / "combined" / "rows.csv")
    assert combined[0] == ["id", "value"] and len(combined) == 1 + 3 * 3
    log = cli("logs", result.run_id, "--shard", "f0").stdout
    # A warm container mounts the input's folder at its own path; one per attempt, the file.
    seen = "/cflow/input/f0.csv" if isolate else str((inputs / "f0.csv").absolute())
    assert f"python /usr/bin/python3 input {seen}" in log
    assert _containers(container_runtime, result.run_id) == []


def test_a_timed_out_container_is_killed_and_fails(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, shell_image: str
) -> None:
    task = make_task(tmp_path / "t", "sleep 3131 &\nsleep 3132\n", name="task.sh")
    result = cli(
        "submit",
        str(task),
        "--shards",
        "1",
        "--timeout",
        "1",
        "--max-attempts",
        "1",
        "--image",
        shell_image,
    )
    assert result.code == 1, result.stderr
    (shard,) = cli.status(result.run_id)["shards"]
    assert shard["state"] == "failed" and "timed out after 1s" in shard["reason"]
    assert _containers(container_runtime, result.run_id) == []
    assert _host_processes("sleep 313[12]") == []


def test_a_background_process_is_gone_after_the_attempt(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str
) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import subprocess
        from pathlib import Path

        def run(shard):
            child = subprocess.Popen(["sleep", "3141"], start_new_session=True)
            (Path(shard.output_dir) / "child.txt").write_text(f"{child.pid}\\n")
        """,
    )
    result = cli("submit", str(task), "--shards", "2", "--image", python_image)
    assert result.code == 0, result.stderr
    assert (
        len((cli.store / "runs" / result.run_id / "combined" / "child.txt").read_text().split())
        == 2
    )
    assert _host_processes("sleep 3141") == []
    assert _containers(container_runtime, result.run_id) == []


def test_sigterm_of_a_busy_worker_preempts_its_container(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str
) -> None:
    inputs = make_inputs(tmp_path / "in", ["a.csv", "b.csv"])
    gate = inputs / "gate"  # in the inputs' folder, which the containers see
    task = make_task(
        tmp_path / "t",
        """
        import time
        from pathlib import Path

        def run(shard):
            print("working", flush=True)
            while not (Path(shard.input).parent / "gate").exists():  # until the test lets go
                time.sleep(0.02)
            (Path(shard.output_dir) / "done.txt").write_text(f"{shard.index}\\n")
        """,
    )
    cli.env["CFLOW_LOG_LEVEL"] = "INFO"  # the runner's word on its workers, shown if one stays
    proc = cli.start(
        "submit",
        str(task),
        "--inputs",
        str(inputs / "*.csv"),
        "--workers",
        "2",
        "--max-attempts",
        "1",
        "--image",
        python_image,
    )
    running = wait_for(
        lambda: len(cli.running_attempts()) == 2 and cli.running_attempts(), 120, "two attempts"
    )
    victim = running[0]
    os.kill(cli.workers()[victim["worker"]], signal.SIGTERM)
    key = (
        f"runs/{victim['run_id']}/shards/{victim['shard_id']}/attempts/{victim['attempt']}"
        "/status.json"
    )
    wait_for(lambda: cli.records(key).get(key, {}).get("state") == "preempted", 60, "preemption")
    gate.touch()  # only now can a shard end: the victim's on its next attempt
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    run_id = out.strip()
    shard = next(s for s in cli.status(run_id)["shards"] if s["id"] == victim["shard_id"])
    states = [a["state"] for a in shard["attempts"]]
    assert states == ["preempted", "succeeded"], states  # not counted against --max-attempts 1
    done = (cli.store / "runs" / run_id / "combined" / "done.txt").read_text().split()
    assert sorted(done) == ["0", "1"]
    assert _containers(container_runtime, run_id) == [], err  # the runner's word on its workers


def test_a_missing_image_is_one_clear_line(
    cli: Cli, tmp_path: Path, container_runtime: Runtime
) -> None:
    task = make_task(tmp_path / "t", COPY_TASK)
    image = "localhost/cflow-test-missing:never"
    result = cli("submit", str(task), "--shards", "2", "--image", image)
    assert result.code == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [lines[0]] and f"image {image} is not on this machine" in lines[0]
    assert "Traceback" not in result.stderr
    assert not list(cli.store.glob("runs/*/run.json"))  # nothing half-made


def test_no_container_engine_is_one_clear_line(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", COPY_TASK)
    empty = tmp_path / "empty-path"
    empty.mkdir()
    cli.env["PATH"] = str(empty)  # neither podman nor docker can be found
    cli.env.pop("CFLOW_CONTAINER_RUNTIME")
    result = cli("submit", str(task), "--shards", "1", "--image", "localhost/anything:1")
    assert result.code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "podman and docker are not installed" in errors[0]
    assert "Traceback" not in result.stderr
    assert not list(cli.store.glob("runs/*/run.json"))


def test_a_gpu_run_without_the_nvidia_toolkit_is_one_clear_line(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str
) -> None:
    if nvidia_cdi_specs() or shutil.which(DOCKER_GPU_HOOK):
        pytest.skip("this machine can pass GPUs into containers")
    task = make_task(tmp_path / "t", COPY_TASK)
    result = cli(
        "submit", str(task), "--shards", "2", "--image", python_image, "--gpu", "nvidia-l4:1"
    )
    assert result.code == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the run has a GPU but" in errors[0], result.stderr
    assert "nvidia-ctk" in errors[0] and "Traceback" not in result.stderr
    assert not list(cli.store.glob("runs/*/run.json"))


def test_a_warm_containers_later_shards_cannot_touch_committed_outputs(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str
) -> None:
    task = make_task(
        tmp_path / "t",
        f"""
        import os
        from pathlib import Path

        STORE = {str(cli.store)!r}

        def run(shard):
            out = Path(shard.output_dir)
            touched = []
            for path in out.parent.rglob("*"):  # the slot's scratch folder, as mounted
                if path.is_file() and path.name == "o.txt":
                    try:
                        path.write_text("overwritten")
                        touched.append(path.name)
                    except OSError:
                        pass
            seen = os.path.exists(os.path.join(STORE, "runs"))  # committed outputs
            (out / "o.txt").write_text(f"{{shard.id}} touched {{len(touched)}} store {{seen}}")
        """,
    )
    result = cli("submit", str(task), "--shards", "4", "--workers", "1", "--image", python_image)
    assert result.code == 0, result.stderr
    committed = sorted(cli.store.glob(f"runs/{result.run_id}/shards/*/attempts/*/out/o.txt"))
    assert len(committed) == 4
    for path in committed:
        assert path.read_text().endswith(" touched 0 store False"), path.read_text()
        assert path.stat().st_mode & 0o777 == 0o444  # sealed
    assert _containers(container_runtime, result.run_id) == []


def test_a_timed_out_warm_container_fails_only_its_shard(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str
) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import subprocess, time
        from pathlib import Path

        def run(shard):
            if shard.index == 0:
                subprocess.Popen(["sleep", "3161"])
                time.sleep(3162)
            (Path(shard.output_dir) / "done.txt").write_text(f"{shard.index}\\n")
        """,
    )
    result = cli(
        "submit",
        str(task),
        "--shards",
        "3",
        "--workers",
        "1",
        "--timeout",
        "2",
        "--max-attempts",
        "1",
        "--image",
        python_image,
    )
    assert result.code == 1, result.stderr
    shards = {s["index"]: s for s in cli.status(result.run_id)["shards"]}
    assert shards[0]["state"] == "failed" and "timed out after 2s" in shards[0]["reason"]
    assert [shards[i]["state"] for i in (1, 2)] == ["succeeded", "succeeded"]
    done = (cli.store / "runs" / result.run_id / "combined" / "done.txt").read_text().split()
    assert sorted(done) == ["1", "2"]
    assert _host_processes("sleep 316[12]") == []
    assert _containers(container_runtime, result.run_id) == []


CONTAINER_LINKS = """
import os
from pathlib import Path

def run(shard):
    out = Path(shard.output_dir)
    (out / "real.txt").write_text("made in the container\\n")
    os.symlink("real.txt", out / "sibling.txt")
    if shard.index == 1:
        os.symlink("/etc/hostname", out / "host.txt")
"""


def test_a_link_made_in_a_container_is_never_followed_out_of_its_outputs(
    cli: Cli, tmp_path: Path, python_image: str
) -> None:
    """Followed on this machine, a container's ``/etc/hostname`` was this machine's: its file
    was copied into the committed outputs. A link within the outputs is still kept as a copy."""
    task = make_task(tmp_path / "links", CONTAINER_LINKS)
    done = cli("submit", str(task), "--shards", "2", "--image", python_image, "--max-attempts", "1")
    assert done.code == 1, done.stderr
    shards = {s["index"]: s for s in cli.status(done.run_id)["shards"]}
    reason = shards[1]["attempts"][-1]["reason"]
    assert "output 'host.txt' is a link to '/etc/hostname', made in the container" in reason
    sealed = cli.store / "runs" / done.run_id / "shards" / shards[0]["id"] / "attempts"
    (out,) = sealed.glob("*/out")
    assert (out / "sibling.txt").read_text() == "made in the container\n"
    assert not (out / "sibling.txt").is_symlink()
    assert not list((cli.store / "runs" / done.run_id / "shards").glob("*/attempts/*/out/host.txt"))
