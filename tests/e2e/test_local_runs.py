"""Whole runs through the CLI on the local backend, with real worker processes."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, Cli, living, make_inputs, make_task, wait_for

pytestmark = pytest.mark.e2e

COPY_TASK = """
import shutil, os
from pathlib import Path

def run(shard):
    print("processing", shard.input)
    shutil.copyfile(shard.input, Path(shard.output_dir) / "rows.csv")
"""

SLEEPY_TASK = """
import os, time
from pathlib import Path

def run(shard):
    seconds = float(shard.params.get("sleep", 0))
    print("sleeping", seconds, flush=True)
    time.sleep(seconds)
    while not os.path.exists(shard.params.get("gate", "/")):  # held until the test lets go
        time.sleep(0.02)
    (Path(shard.output_dir) / "done.txt").write_text(f"{shard.index}\\n")
"""


def _params(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def test_example_task_runs_end_to_end(cli: Cli, tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "examples/make_data.py"),
            str(data),
            "--files",
            "6",
            "--rows",
            "500",
        ],
        check=True,
        capture_output=True,
    )
    result = cli(
        "submit",
        str(REPO / "task"),
        "--inputs",
        str(data / "*.csv"),
        "--workers",
        "2",
        "--out",
        str(tmp_path / "combined"),
    )
    assert result.code == 0, result.stderr
    assert "local backend" in result.stderr
    run_id = result.run_id
    assert result.stdout.strip() == run_id  # stdout carries only the run id
    predictions = _rows(tmp_path / "combined" / "predictions.csv")
    assert predictions[0] == ["source", "id", "prediction"]
    assert len(predictions) == 1 + 6 * 100  # every fifth of 500 rows, header once
    assert {row[0] for row in predictions[1:]} == {f"region-{n:03d}.csv" for n in range(6)}
    models = (tmp_path / "combined" / "models.jsonl").read_text().splitlines()
    assert len(models) == 6 and all(json.loads(m)["train_rmse"] < 0.2 for m in models)
    status = cli.status(run_id)
    assert status["counts"]["succeeded"] == 6 and status["state"] == "finished"
    wait_for(lambda: not living(cli.workers().values()), 30, "the workers to be gone")


def test_submit_ends_with_no_worker_running(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", COPY_TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    inputs = make_inputs(tmp_path / "in", [f"f{i}.csv" for i in range(8)])
    result = cli("submit", str(task), "--inputs", str(inputs / "*.csv"), "--workers", "3")
    assert result.code == 0, result.stderr
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--store {cli.store}"], capture_output=True, text=True
    )
    assert found.returncode in (0, 1), found.stderr  # 1: no process matched
    pids = [int(p) for p in found.stdout.split()]
    assert pids == []
    combined = _rows(cli.store / "runs" / result.run_id / "combined" / "rows.csv")
    assert combined[0] == ["id", "value"] and len(combined) == 1 + 8 * 3


def test_the_runner_says_what_it_does_at_the_log_level_asked_for(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def run(shard):\n    pass\n")
    cli.env["CFLOW_LOG_LEVEL"] = "info"
    result = cli("submit", str(task), "--shards", "2", "--workers", "2")
    assert result.code == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if " cflow.runner INFO " in line]
    assert any("scaling down: deleting idle" in line for line in said), result.stderr
    cli.env["CFLOW_LOG_LEVEL"] = "loud"
    result = cli("runs")
    assert result.code == 2
    assert result.stderr.strip() == (
        "error: CFLOW_LOG_LEVEL=loud is no log level (say DEBUG, INFO or WARNING)"
    )


def test_shell_task_and_slots(cli: Cli, tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in", [f"f{i}.csv" for i in range(5)])
    shell_task = REPO / "examples" / "shell-task"
    result = cli(
        "submit",
        str(shell_task),
        "--inputs",
        str(inputs / "*.csv"),
        "--workers",
        "1",
        "--slots",
        "3",
    )
    assert result.code == 0, result.stderr
    counts = _rows(cli.store / "runs" / result.run_id / "combined" / "counts.csv")
    assert counts[0] == ["source", "records", "y_sum"]
    assert sorted(r[0] for r in counts[1:]) == [f"f{i}.csv" for i in range(5)]
    assert all(r[1] == "3" for r in counts[1:])


def test_odd_input_names_get_safe_stable_ids(cli: Cli, tmp_path: Path) -> None:
    names = ["a b.csv", "ünï cödé.csv", "x;$(touch pwned)|&.csv", "-rf.csv", "日本.csv"]
    inputs = make_inputs(tmp_path / "in", names)
    task = make_task(tmp_path / "t", COPY_TASK)
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    result = cli("submit", str(task), "--inputs", str(inputs / "*.csv"), "--workers", "2")
    assert result.code == 0, result.stderr
    assert not (tmp_path / "pwned").exists() and not (REPO / "pwned").exists()
    shards = cli.status(result.run_id)["shards"]
    assert len(shards) == 5 and all(s["state"] == "succeeded" for s in shards)
    for shard in shards:
        assert all(c.isalnum() or c in "-_." for c in shard["id"]), shard["id"]
    again = cli("submit", str(task), "--inputs", str(inputs / "*.csv"), "--workers", "1")
    assert sorted(s["id"] for s in cli.status(again.run_id)["shards"]) == sorted(
        s["id"] for s in shards
    )
    combined = _rows(cli.store / "runs" / result.run_id / "combined" / "rows.csv")
    assert len(combined) == 1 + 5 * 3


def test_fail_once_then_succeed_and_poison_shard(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import sys
        from pathlib import Path

        def run(shard):
            kind = shard.params["kind"]
            if kind == "flaky" and shard.attempt == 1:
                raise RuntimeError("transient trouble on the first try")
            if kind == "poison":
                print("this input is broken", flush=True)
                sys.exit(7)
            (Path(shard.output_dir) / "out.txt").write_text(kind + "\\n")
    """,
    )
    params = _params(
        tmp_path / "p.jsonl",
        [{"kind": "ok"}, {"kind": "flaky"}, {"kind": "poison"}, {"kind": "ok"}],
    )
    result = cli(
        "submit", str(task), "--params", str(params), "--workers", "2", "--max-attempts", "3"
    )
    assert result.code == 1, result.stderr
    assert "3/4 shards succeeded, 1 failed" in result.stderr
    shards = {s["index"]: s for s in cli.status(result.run_id)["shards"]}
    assert shards[1]["state"] == "succeeded" and len(shards[1]["attempts"]) == 2
    assert shards[1]["attempts"][0]["state"] == "failed"
    poison = shards[2]
    assert poison["state"] == "failed" and poison["exit_code"] == 7
    assert [a["state"] for a in poison["attempts"]] == ["failed"] * 3
    log = cli("logs", result.run_id, "--shard", poison["id"])
    assert "this input is broken" in log.stdout
    combined = (cli.store / "runs" / result.run_id / "combined" / "out.txt").read_text()
    assert sorted(combined.split()) == ["flaky", "ok", "ok"]


def test_timeout_kills_the_task_process_group(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        #!/usr/bin/env bash
        sleep 300 &
        echo "child $!" > "$CFLOW_OUTPUT_DIR/child.pid"
        wait
    """,
        name="task.sh",
    )
    result = cli("submit", str(task), "--shards", "1", "--timeout", "1", "--max-attempts", "1")
    assert result.code == 1
    (shard,) = cli.status(result.run_id)["shards"]
    assert shard["state"] == "failed" and "timed out after 1s" in shard["reason"]
    pid_file = next(cli.store.glob("runs/*/shards/*/attempts/1/out/child.pid"))
    child = int(pid_file.read_text().split()[1])
    wait_for(lambda: not living([child]), 10, "the task's child to be killed")


def test_cancel_stops_a_running_run(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", SLEEPY_TASK)
    params = _params(tmp_path / "p.jsonl", [{"gate": str(tmp_path / "never")}] * 6)
    proc = cli.start("submit", str(task), "--params", str(params), "--workers", "2")
    wait_for(cli.running_attempts, 30, "a running attempt")
    run_id = next(cli.store.glob("runs/*/run.json")).parent.name
    result = cli("cancel", run_id)
    assert result.code == 0 and "cancelled" in result.stderr
    status = cli.status(run_id)  # at once, whatever the workers are still doing
    assert status["state"] == "cancelled"
    assert {s["state"] for s in status["shards"]} == {"cancelled"}
    assert status["counts"]["queued"] == 0 and status["counts"]["running"] == 0
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "cancelled" in err
    wait_for(lambda: not living(cli.workers().values()), 30, "workers to stop")
    watched = cli("watch", run_id)
    assert watched.code == 2 and "was cancelled" in watched.stderr  # nothing to watch


def test_runs_and_logs_list_what_happened(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", COPY_TASK)
    inputs = make_inputs(tmp_path / "in", ["one.csv"])
    run_id = cli("submit", str(task), "--inputs", str(inputs / "*.csv")).run_id
    listing = cli("runs")
    assert run_id in listing.stdout and "1/1" in listing.stdout
    logs = cli("logs", run_id)
    assert "succeeded" in logs.stdout and "log.txt" in logs.stdout
    shard_log = cli("logs", run_id, "--shard", "one")
    assert "processing" in shard_log.stdout


LOUD_TASK = """
import sys

def run(shard):
    for n in range(3000):
        sys.stdout.write(f"{n:07d} " + "x" * 992 + "\\n")
"""


def test_logs_hands_on_a_log_of_several_pieces_whole(cli: Cli, tmp_path: Path) -> None:
    """The log was read whole into memory (2 GB of it for a 2 GB log), and again at every
    poll of --follow: it is read a piece (LOG_PIECE) at a time now, every byte still shown."""
    task = make_task(tmp_path / "t", LOUD_TASK)
    run_id = cli("submit", str(task), "--shards", "1").run_id
    shown = cli("logs", run_id, "--shard", "00000").stdout.splitlines()
    lines = [line for line in shown if line.endswith("x" * 992)]
    assert [line[:7] for line in lines] == [f"{n:07d}" for n in range(3000)]  # 3 MB, in order


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "{tmp}/missing", "--shards", "1"], "task folder"),
        (["submit", "{tmp}/empty", "--shards", "1"], "neither task.py"),
        (["submit", "{task}", "--inputs", "{tmp}/nothing/*.csv"], "matches no files"),
        (["submit", "{task}", "--params", "{tmp}/bad.jsonl"], "line 2"),
        (["submit", "{task}", "--shards", "0"], "at least 1"),
        (["submit", "{task}", "--shards", "2", "--workers", "0"], "--workers"),
        (["submit", "{task}"], "exactly one of"),
        (["status", "r20200101-000000-abcdef"], "no run"),
        (["status", "../../etc"], "not a run id"),
        (["logs", "r20200101-000000-abcdef"], "no run"),
        (["retry", "r20200101-000000-abcdef", "--failed"], "no run"),
    ],
)
def test_bad_input_gets_one_clear_line(
    cli: Cli, tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{"a": \n')
    task = make_task(tmp_path / "t", COPY_TASK)
    argv = [a.format(tmp=tmp_path, task=task) for a in args]
    result = cli(*argv)
    assert result.code == 2, (result.stdout, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(cli.store.glob("runs/*/run.json"))  # nothing half-made


def test_retry_of_a_running_run_is_refused(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", SLEEPY_TASK)
    params = _params(tmp_path / "p.jsonl", [{"gate": str(tmp_path / "never")}])
    run_id = cli("submit", str(task), "--params", str(params), "--detach").run_id
    result = cli("retry", run_id, "--failed")
    assert result.code == 2 and "still going" in result.stderr
    assert cli("cancel", run_id).code == 0


def test_detach_then_watch_reattaches_and_finishes(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", SLEEPY_TASK)
    params = _params(tmp_path / "p.jsonl", [{"sleep": 0.5}] * 4)
    submitted = cli("submit", str(task), "--params", str(params), "--workers", "2", "--detach")
    assert submitted.code == 0 and "runner watch" in submitted.stderr
    watched = cli("watch", submitted.run_id)
    assert watched.code == 0, watched.stderr
    assert "4/4 shards succeeded" in watched.stderr
    assert cli.status(submitted.run_id)["state"] == "finished"


def test_a_detached_run_all_done_but_unwatched_says_what_finishes_it(
    cli: Cli, tmp_path: Path
) -> None:
    """It showed as ``active 3/3`` for ever, and prune kept it as "still active"."""
    task = make_task(tmp_path / "t", SLEEPY_TASK)
    run_id = cli("submit", str(task), "--shards", "3", "--detach").run_id
    wait_for(lambda: len(cli.records(f"runs/{run_id}/shards/*/result.json")) == 3, 60, "3 commits")
    listed = cli("runs")
    assert "active, all done" in listed.stdout
    hint = f"`runner watch {run_id}` combines its outputs and finishes it"
    assert hint in listed.stderr
    assert hint in cli("prune", "--older-than", "0s").stderr
    assert cli("watch", run_id).code == 0
    assert cli.status(run_id)["state"] == "finished"


def test_ctrl_c_with_cancel_on_interrupt_cancels(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", SLEEPY_TASK)
    params = _params(tmp_path / "p.jsonl", [{"gate": str(tmp_path / "never")}] * 3)
    proc = cli.start(
        "submit", str(task), "--params", str(params), "--workers", "2", "--cancel-on-interrupt"
    )
    wait_for(cli.running_attempts, 30, "a running attempt")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "cancelled" in err
    assert cli.status(out.strip())["state"] == "cancelled"
    wait_for(lambda: not living(cli.workers().values()), 30, "workers to stop")


def test_logs_follow_streams_a_running_shard(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import time

        def run(shard):
            for i in range(4):
                print("tick", i, flush=True)
                time.sleep(0.5)
    """,
    )
    run_id = cli("submit", str(task), "--shards", "1", "--detach").run_id
    wait_for(cli.running_attempts, 30, "the shard to start")
    followed = cli("logs", run_id, "--shard", "00000", "--follow", timeout=60)
    assert followed.code == 0
    assert [line for line in followed.stdout.splitlines() if line.startswith("tick")] == [
        f"tick {i}" for i in range(4)
    ]


def test_idle_workers_are_stopped_while_a_slow_shard_runs(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", SLEEPY_TASK)
    gate = tmp_path / "gate"
    params = _params(tmp_path / "p.jsonl", [{"gate": str(gate)}, {}, {}])
    proc = cli.start("submit", str(task), "--params", str(params), "--workers", "3")
    wait_for(lambda: len(cli.workers()) == 3, 30, "three workers")

    def shrunk_while_busy() -> bool:
        busy = cli.running_attempts()
        return bool(busy) and len(living(cli.workers().values())) == 1

    # The slow shard runs until the gate opens, so the fleet shrinks around it, however long
    # the idle workers take to say so.
    wait_for(shrunk_while_busy, 120, "the fleet to shrink to the one busy worker")
    gate.touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    states = cli.attempt_states(out.strip())
    assert states == ["succeeded"] * 3, states  # the busy worker was never stopped
