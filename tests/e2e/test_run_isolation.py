"""Every run is its own: a task's working folder, its bundle, its workers and its cancel."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.containers.conftest import container_runtime, python_image
from tests.e2e.conftest import Cli, alive, make_task, wait_for
from worker.executors.container.runtime import Runtime

pytestmark = pytest.mark.e2e
__all__ = ["container_runtime", "python_image"]  # the session fixtures

# Writes model.bin in its working folder, and says whether one was there already.
CACHING_TASK = """
import os
from pathlib import Path

def run(shard):
    seen = "seen" if os.path.exists("model.bin") else "fresh"
    Path("model.bin").write_text("weights")
    apart = os.getcwd() != str(Path(__file__).parent)
    (Path(shard.output_dir) / "seen.csv").write_text(f"{seen},{apart}\\n")
"""

# Reports the modes of its own folder and file, then tries to write beside its task.py.
BUNDLE_WRITER = """
import os, stat
from pathlib import Path

def run(shard):
    here = Path(__file__).parent
    modes = [stat.S_IMODE(os.stat(p).st_mode) for p in (here, here / "task.py")]
    writable = [mode for mode in modes if mode & 0o222]
    (Path(shard.output_dir) / "modes.csv").write_text(f"{len(writable)}\\n")
    if shard.params.get("write"):
        (here / "cache.bin").write_text("x")
"""


# Records its pid, runs a while, then waits for the test's gate file and writes an output.
GATED_TASK = """
import os, time
from pathlib import Path

def run(shard):
    Path(shard.params["pids"], str(shard.index)).write_text(str(os.getpid()))
    time.sleep(float(shard.params["busy"]))
    while not os.path.exists(shard.params["gate"]):
        time.sleep(0.02)
    (Path(shard.output_dir) / "done.txt").write_text("done\\n")
"""


def _gated(cli: Cli, tmp_path: Path, shards: int, busy: float) -> tuple[str, Path, Path]:
    """A detached run of GATED_TASK, once each of its shards' tasks has started."""
    task = make_task(tmp_path / "gated", GATED_TASK)
    pids, gate = tmp_path / "pids", tmp_path / "gate"
    pids.mkdir()
    params = tmp_path / "params.jsonl"
    row = f'{{"pids": "{pids}", "gate": "{gate}", "busy": {busy}}}\n'
    params.write_text(row * shards)
    r = cli("submit", str(task), "--params", str(params), "--workers", str(shards), "--detach")
    assert r.code == 0, r.stderr
    wait_for(lambda: len(list(pids.iterdir())) == shards, what="every task started")
    return r.run_id, pids, gate


def _combined(cli: Cli, run_id: str, name: str) -> str:
    return (cli.store / "runs" / run_id / "combined" / name).read_text()


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolated"])
def test_a_task_writing_in_its_working_folder_never_leaks_into_the_next_run(
    cli: Cli, tmp_path: Path, isolate: bool
) -> None:
    task = make_task(tmp_path / "cache", CACHING_TASK)
    args = ["--shards", "2", "--workers", "1", *(["--isolate"] if isolate else [])]
    first = cli("submit", str(task), *args)
    assert first.code == 0, first.stderr
    second = cli("submit", str(task), *args)
    assert second.code == 0, second.stderr
    # Same code, same bundle: each attempt still starts in an empty folder of its own, which
    # is not the task's folder.
    assert _combined(cli, first.run_id, "seen.csv") == "fresh,True\nfresh,True\n"
    assert _combined(cli, second.run_id, "seen.csv") == "fresh,True\nfresh,True\n"
    outputs = cli.store / "runs" / second.run_id
    assert not list(outputs.rglob("model.bin"))  # a working file is no output


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "per-attempt"])
def test_in_a_container_each_attempt_has_its_own_working_folder(
    cli: Cli, tmp_path: Path, container_runtime: Runtime, python_image: str, isolate: bool
) -> None:
    cli.env["CFLOW_CONTAINER_RUNTIME"] = container_runtime.name
    task = make_task(tmp_path / "cache", CACHING_TASK)
    args = ["--shards", "2", "--workers", "1", "--image", python_image]
    args += ["--isolate"] if isolate else []
    for _ in range(2):
        r = cli("submit", str(task), *args, timeout=300)
        assert r.code == 0, r.stderr
        assert _combined(cli, r.run_id, "seen.csv") == "fresh,True\nfresh,True\n"


def test_the_task_folder_is_read_only_to_the_task(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "writer", BUNDLE_WRITER)
    r = cli("submit", str(task), "--shards", "1", "--workers", "1")
    assert r.code == 0, r.stderr
    assert _combined(cli, r.run_id, "modes.csv") == "0\n"  # no write bit on folder or file


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes past file modes")
def test_writing_into_the_task_folder_fails_with_a_permission_error(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "writer", BUNDLE_WRITER)
    params = tmp_path / "params.jsonl"
    params.write_text('{"write": true}\n')
    r = cli("submit", str(task), "--params", str(params), "--workers", "1", "--max-attempts", "1")
    assert r.code != 0
    (shard,) = cli.status(r.run_id)["shards"]
    assert shard["reason"].startswith("PermissionError: [Errno 13] Permission denied"), shard
    assert stat.S_IMODE(os.stat(task).st_mode) & 0o200  # the user's own folder is untouched


def test_a_local_cancel_stops_the_running_tasks_within_seconds(cli: Cli, tmp_path: Path) -> None:
    run_id, pids, _gate = _gated(cli, tmp_path, shards=2, busy=0)
    tasks = [int(p.read_text()) for p in pids.iterdir()]
    assert cli("cancel", run_id).code == 0
    # The tasks would wait for the gate forever: only the cancel ends them.
    wait_for(lambda: not any(alive(pid) for pid in tasks), timeout=8, what="the tasks to stop")
    wait_for(lambda: not cli.running_attempts(), timeout=8, what="the attempts to settle")
    assert cli.records(f"runs/{run_id}/shards/*/result.json") == {}
    reasons = {s["reason"] for s in cli.status(run_id)["shards"]}
    assert reasons == {"run cancelled"}


def test_a_task_that_ends_after_the_cancel_never_commits(cli: Cli, tmp_path: Path) -> None:
    run_id, _pids, gate = _gated(cli, tmp_path, shards=2, busy=2.5)
    assert cli("cancel", run_id).code == 0
    gate.touch()  # the tasks finish at once, before the next look at the manifest

    def settled() -> int:  # attempts that committed, and those that ended otherwise
        ended = cli.records(f"runs/{run_id}/shards/*/attempts/*/status.json").values()
        done = cli.records(f"runs/{run_id}/shards/*/result.json")
        return len(done) + sum(a["state"] != "running" for a in ended)

    wait_for(lambda: settled() == 2, what="both attempts to settle")
    assert cli.records(f"runs/{run_id}/shards/*/result.json") == {}
    combined = cli("combine", run_id)
    assert not (cli.store / "runs" / run_id / "combined" / "done.txt").exists(), combined.stderr
