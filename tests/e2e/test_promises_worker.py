"""The worker's promises against tasks written as a new user would, through the real CLI.

Committed outputs never change after the commit, whatever the task leaves running; preemption
never fails a shard; a task may do what it likes to its own streams and name its files anything.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, alive, living, make_task, wait_for

pytestmark = pytest.mark.e2e


def _outputs(cli: Cli, run_id: str) -> dict[str, bytes]:
    found = {}
    for path in sorted((cli.store / "runs" / run_id / "shards").glob("*/attempts/*/out/**/*")):
        if path.is_file():
            found[str(path.relative_to(cli.store))] = path.read_bytes()
    return found


PY_LEAVES_WRITERS = """
import subprocess, sys
from pathlib import Path

LATE = "import sys, time; time.sleep(1.5); open(sys.argv[1], 'a').write('late\\\\n')"

def run(shard):
    out = Path(shard.output_dir) / "out.txt"
    out.write_text(f"{shard.index}\\n")
    pids = [
        subprocess.Popen([sys.executable, "-c", LATE, str(out)]).pid,
        subprocess.Popen([sys.executable, "-c", LATE, str(out)], start_new_session=True).pid,
    ]
    (Path(shard.output_dir) / "pids.txt").write_text(" ".join(map(str, pids)))
"""

SH_LEAVES_WRITERS = """
#!/usr/bin/env bash
echo "$CFLOW_SHARD_INDEX" > "$CFLOW_OUTPUT_DIR/out.txt"
(sleep 1.5; echo late >> "$CFLOW_OUTPUT_DIR/out.txt") &
a=$!
setsid bash -c 'sleep 1.5; echo late >> "$0"' "$CFLOW_OUTPUT_DIR/out.txt" &
echo "$a $!" > "$CFLOW_OUTPUT_DIR/pids.txt"
"""


@pytest.mark.parametrize(
    ("name", "body", "extra"),
    [
        ("task.py", PY_LEAVES_WRITERS, []),
        ("task.py", PY_LEAVES_WRITERS, ["--isolate"]),
        ("task.sh", SH_LEAVES_WRITERS, []),
    ],
    ids=["python-warm", "python-isolate", "shell"],
)
def test_background_children_never_change_committed_outputs(
    cli: Cli, tmp_path: Path, name: str, body: str, extra: list[str]
) -> None:
    task = make_task(tmp_path / "t", body, name=name)
    result = cli("submit", str(task), "--shards", "3", "--workers", "2", *extra)
    assert result.code == 0, result.stderr
    before = _outputs(cli, result.run_id)
    combined = cli.store / "runs" / result.run_id / "combined" / "out.txt"
    combined_before = combined.read_text()
    assert sorted(combined_before.split()) == ["0", "1", "2"]
    pids = [int(p) for k, v in before.items() if k.endswith("pids.txt") for p in v.decode().split()]
    assert len(pids) == 6
    # Each ended with its attempt, long before the run did. One left alive writes "late" into
    # the outputs before it ends by itself: before they were read, or after (then they differ).
    assert not [key for key, data in before.items() if b"late" in data]
    assert living(pids) == []
    assert _outputs(cli, result.run_id) == before
    for key in before:  # sealed: read-only files
        assert not (cli.store / key).stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    again = cli("combine", result.run_id)
    assert again.code == 0, again.stderr
    assert combined.read_text() == combined_before


def test_bash_dies_with_its_worker(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        #!/usr/bin/env bash
        echo $$ > "$CFLOW_OUTPUT_DIR/../bash.pid"
        sleep 300
        """,
        name="task.sh",
    )
    proc = cli.start("submit", str(task), "--shards", "1", "--workers", "1", "--detach")
    proc.communicate(timeout=60)
    pid_file = wait_for(
        lambda: next(cli.store.glob("scratch/*/slot-0/bash.pid"), None), 30, "the task to start"
    )
    bash = int(wait_for(lambda: pid_file.read_text().strip(), 10, "the pid"))
    (worker_pid,) = cli.workers().values()
    os.kill(worker_pid, signal.SIGKILL)
    wait_for(lambda: not alive(bash), 10, "bash to die with its worker")
    cli("cancel", (cli.store / "runs").iterdir().__next__().name)


def test_a_shard_preempted_twelve_times_still_succeeds(cli: Cli, tmp_path: Path) -> None:
    flag = tmp_path / "go"
    task = make_task(
        tmp_path / "t",
        f"""
        import time
        from pathlib import Path

        def run(shard):
            print("attempt", shard.attempt, "waits", flush=True)
            (Path({str(tmp_path)!r}) / f"began-{{shard.attempt}}").touch()
            while not Path({str(flag)!r}).exists():
                time.sleep(0.05)
            (Path(shard.output_dir) / "done.txt").write_text("done")
        """,
    )
    proc = cli.start("submit", str(task), "--shards", "1", "--workers", "1", "--max-attempts", "1")
    seen: set[int] = set()
    for _ in range(12):
        attempt = wait_for(
            lambda: [a for a in cli.running_attempts() if a["attempt"] not in seen],
            30,
            "a new running attempt",
        )[0]
        seen.add(attempt["attempt"])
        # Stopped once its task runs: a worker stopped while it still prepares the attempt
        # records "worker stopped before it started", also a preemption, but not this case.
        began = tmp_path / f"began-{attempt['attempt']}"
        wait_for(began.exists, 30, f"attempt {attempt['attempt']}'s task to begin")
        pid = cli.workers()[attempt["worker"]]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda p=pid: not alive(p), 20, "the preempted worker to exit")
    flag.write_text("go")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    (shard,) = cli.status(out.split()[0])["shards"]
    states = [a["state"] for a in shard["attempts"]]
    assert shard["state"] == "succeeded"
    assert states == ["preempted"] * 12 + ["succeeded"], states  # none counted as a failure
    reasons = {a["reason"] for a in shard["attempts"][:-1]}
    assert reasons == {"worker stopped (preemption)"}
    first = cli("logs", out.split()[0], "--shard", shard["id"], "--attempt", "1")
    assert "attempt 1 waits" in first.stdout  # a preempted attempt keeps its log


def test_a_task_that_closes_its_streams_and_names_files_like_records(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import json, sys
        from pathlib import Path

        def run(shard):
            out = Path(shard.output_dir)
            print("hello from", shard.id)
            for name in ("status.json", "result.json", "failed.json", "log.txt"):
                (out / name).write_text(json.dumps({"state": "mine", "n": shard.index}))
            (out / "attempts" / "1").mkdir(parents=True)
            (out / "attempts" / "1" / "status.json").write_text("[1, 2, 3]")
            sys.stdout.close()
            sys.stderr.close()
        """,
    )
    result = cli("submit", str(task), "--shards", "2", "--workers", "1")
    assert result.code == 0, result.stderr
    status = cli.status(result.run_id)
    assert status["counts"]["succeeded"] == 2
    for shard in status["shards"]:
        assert [a["state"] for a in shard["attempts"]] == ["succeeded"]
    logs = cli("logs", result.run_id, "--shard", status["shards"][0]["id"])
    assert logs.code == 0, logs.stderr
    assert "hello from" in logs.stdout
    plain = cli("status", result.run_id)
    assert plain.code == 0, plain.stderr
    outputs = _outputs(cli, result.run_id)
    mine = [json.loads(v) for k, v in outputs.items() if k.endswith("/out/status.json")]
    assert sorted(m["n"] for m in mine) == [0, 1]


def test_a_workers_own_log_is_shown_by_name(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def run(shard):\n    pass\n")
    result = cli("submit", str(task), "--shards", "2", "--workers", "1")
    assert result.code == 0, result.stderr
    (name,) = [p.stem for p in (cli.store / "fleet" / "logs").glob("*.log")]
    shown = cli("logs", result.run_id, "--worker", name)
    assert shown.code == 0, shown.stderr
    assert f"worker {name} exiting" in shown.stdout
    missing = cli("logs", result.run_id, "--worker", "no-such-worker")
    assert missing.code == 2 and "no log of worker no-such-worker" in missing.stderr
