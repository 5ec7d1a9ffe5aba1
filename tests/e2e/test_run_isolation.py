"""Every run is its own: its workers, a task's working folder, and its bundle."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.containers.conftest import container_runtime, python_image
from tests.e2e.conftest import Cli, alive, make_task, wait_for
from worker.backends.local.queue import LocalQueue
from worker.executors.container.runtime import Runtime
from worker.protocol import WorkMessage

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


# Says which MYSETTING it saw; with a gate, first marks itself started and waits for the gate,
# so the test sees how many of a run's shards run at once before any ends.
ENV_TASK = """
import os, time
from pathlib import Path

def run(shard):
    gate = shard.params.get("gate")
    if gate:
        Path(shard.params["started"], str(shard.index)).touch()
        while not os.path.exists(gate):
            time.sleep(0.02)
    (Path(shard.output_dir) / "seen.csv").write_text(os.environ.get("MYSETTING", "") + "\\n")
"""


def _gated_params(tmp_path: Path, name: str, shards: int, gate: Path) -> tuple[Path, Path]:
    """A params file of ``shards`` gated shards, and the folder they mark themselves started in."""
    started = tmp_path / f"started-{name}"
    started.mkdir()
    params = tmp_path / f"{name}.jsonl"
    row = json.dumps({"started": str(started), "gate": str(gate)}) + "\n"
    params.write_text(row * shards)
    return params, started


def _workers_of(cli: Cli, run_id: str) -> set[str]:
    return {a["worker"] for s in cli.status(run_id)["shards"] for a in s["attempts"]}


def test_a_run_after_a_detached_one_runs_in_workers_of_its_own(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "env", ENV_TASK)
    cli.env["MYSETTING"] = "gamma"
    args = ["--shards", "2", "--workers", "2", "--idle-timeout", "300", "--detach"]
    first = cli("submit", str(task), *args)
    assert first.code == 0, first.stderr
    wait_for(
        lambda: len(cli.records(f"runs/{first.run_id}/shards/*/result.json")) == 2,
        what="the detached run to finish",
    )
    lingering = cli.workers()  # its workers linger, idle, for their idle timeout
    assert lingering
    # The next run asks for another environment and two slots in one worker: both its shards
    # must start side by side, before the gate opens, in a worker started for it.
    gate = tmp_path / "gate"
    params, started = _gated_params(tmp_path, "second", 2, gate)
    cli.env["MYSETTING"] = "delta"
    second = cli.start(
        "submit", str(task), "--params", str(params), "--workers", "1", "--slots", "2"
    )
    try:
        wait_for(lambda: len(list(started.iterdir())) == 2, what="both shards in one worker")
    finally:
        gate.touch()
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    run_id = stdout.split()[0]
    assert cli("combine", first.run_id).code == 0  # detached: nobody combined it
    assert _combined(cli, first.run_id, "seen.csv") == "gamma\ngamma\n"
    assert _combined(cli, run_id, "seen.csv") == "delta\ndelta\n"
    assert len(_workers_of(cli, run_id)) == 1
    assert not _workers_of(cli, run_id) & _workers_of(cli, first.run_id)
    # The second run's end let its own worker go, and left the first run's alone.
    assert all(alive(pid) for pid in lingering.values())


def test_two_submits_at_once_each_run_in_their_own_workers(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "env", ENV_TASK)
    gate = tmp_path / "gate"
    runs = {}
    for name, slots in (("first", "1"), ("second", "2")):
        params, started = _gated_params(tmp_path, name, 2, gate)
        cli.env["MYSETTING"] = name
        args = ["--params", str(params), "--workers", "1", "--slots", slots]
        runs[name] = (cli.start("submit", str(task), *args), started)
    try:
        # One slot: one shard of the first at a time; two: both of the second at once.
        wait_for(
            lambda: [len(list(started.iterdir())) for _, started in runs.values()] == [1, 2],
            what="each run's shards to start in its own workers",
        )
    finally:
        gate.touch()
    ids = {}
    for name, (proc, _) in runs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        ids[name] = stdout.split()[0]
        assert _combined(cli, ids[name], "seen.csv") == f"{name}\n{name}\n"
    assert not _workers_of(cli, ids["first"]) & _workers_of(cli, ids["second"])


def test_a_queue_opened_for_a_run_receives_that_run_s_messages_only(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    shared = LocalQueue(path)
    own = LocalQueue(path, run_id="r-b")
    try:
        shared.publish(WorkMessage(run_id=r, shard={"id": r, "index": 0}) for r in ("r-a", "r-b"))
        assert [d.message.run_id for d in own.receive(10, 0)] == ["r-b"]  # though r-a is older
        assert own.receive(10, 0) == []
        assert [d.message.run_id for d in shared.receive(10, 0)] == ["r-a"]
    finally:
        own.close()
        shared.close()


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
