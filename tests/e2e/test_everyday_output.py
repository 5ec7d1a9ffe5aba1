"""Output a script can read, through the CLI: plain progress, whole ids, JSON, exit codes."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_inputs, make_task, wait_for

pytestmark = pytest.mark.e2e

OK_TASK = """
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "o.txt").write_text(f"{shard.index}\\n")
"""

GATED_TASK = """
import os, time
from pathlib import Path

def run(shard):
    while not os.path.exists(GATE):  # held until the test lets go
        time.sleep(0.02)
    (Path(shard.output_dir) / "o.txt").write_text(f"{shard.index}\\n")
"""

SLOW_TASK = """
import time
from pathlib import Path

def run(shard):
    time.sleep(float(shard.params.get("sleep", 2)))
    (Path(shard.output_dir) / "o.txt").write_text(f"{shard.index}\\n")
"""


def test_without_a_terminal_progress_is_plain_lines_and_ids_are_whole(
    cli: Cli, tmp_path: Path
) -> None:
    cli.env["COLUMNS"] = "80"  # what a pipe or CI log gets
    long_names = [f"{'very-long-input-name-' * 3}{i}.csv" for i in range(3)]
    inputs = make_inputs(tmp_path / "in", long_names)
    task = make_task(tmp_path / "t", SLOW_TASK.replace('get("sleep", 2)', 'get("sleep", 0)'))
    r = cli("submit", str(task), "--inputs", str(inputs / "*.csv"), "--workers", "2")
    assert r.code == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    progress = [line for line in r.stderr.splitlines() if " done, " in line]
    assert progress and all(line.startswith(f"cflow: run {r.run_id}: ") for line in progress)
    assert any(len(line) > 80 for line in r.stderr.splitlines())  # not hard-wrapped
    status = cli("status", r.run_id)
    ids = [s["id"] for s in cli.status(r.run_id)["shards"]]
    assert all(len(i) > 40 for i in ids)
    for shard_id in ids:
        assert shard_id in status.stdout
    assert r.run_id in cli("runs").stdout


def test_version_json_runs_state_filter_and_doctor(cli: Cli, tmp_path: Path) -> None:
    version = cli("--version")
    assert version.code == 0 and version.stdout.startswith("cflow ")
    assert cli("runs", "--json").stdout.strip() == "[]" and not cli.store.exists()
    empty = cli("runs")
    assert empty.code == 0 and "no runs yet" in empty.stderr and not cli.store.exists()
    task = make_task(
        tmp_path / "t",
        "def run(shard):\n    if shard.index == 1:\n        raise ValueError('one bad')\n",
    )
    r = cli("submit", str(task), "--shards", "3", "--halt", "never", "--max-attempts", "1")
    assert r.code == 1
    (run,) = json.loads(cli("runs", "--json").stdout)
    assert run["run_id"] == r.run_id and run["shards"] == 3 and run["committed"] == 2
    failed = json.loads(cli("status", r.run_id, "--json", "--state", "failed").stdout)
    assert [s["index"] for s in failed["shards"]] == [1] and failed["counts"]["failed"] == 1
    table = cli("status", r.run_id, "--state", "succeeded")
    assert "00000" in table.stdout and "00001" not in table.stdout
    doctor = cli("doctor", "--json")
    assert doctor.code == 0, doctor.stderr
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert checks["store"]["ok"] and checks["bash"]["ok"]


def test_option_errors_are_one_line_with_code_2(cli: Cli, tmp_path: Path) -> None:
    for args in (
        ("submit", "--no-such-option"),
        ("status",),
        ("submit", str(tmp_path), "--shards", "x"),
        ("status", "r1", "--state", "sleeping"),
    ):
        r = cli(*args)
        assert r.code == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
        assert "╭" not in r.stderr and r.stdout == ""


def test_a_file_where_a_folder_belongs_is_named_as_a_file(cli: Cli, tmp_path: Path) -> None:
    """A task folder that is a file was said not to exist; a store that is a file (CFLOW_STORE
    set to one) listed "no runs yet" with exit 0, and `report` ended in a traceback."""
    task = make_task(tmp_path / "t", OK_TASK)
    r = cli("submit", str(task / "task.py"), "--shards", "1", "--dry-run")
    assert r.code == 2 and r.stderr == (
        f"error: {task / 'task.py'} is a file, not a folder; pass the folder holding task.py"
        " or task.sh\n"
    )
    cli.store.write_text("")
    for args in (
        ("runs",),
        ("status", "r20200101-000000-abcdef"),
        ("report", "r20200101-000000-abcdef"),
    ):
        r = cli(*args)
        assert r.code == 2, (args, r.stderr)
        assert r.stderr == (
            f"error: the store {cli.store} is not a folder; pass --store DIR or set CFLOW_STORE\n"
        ), args


def test_ctrl_c_detaches_with_code_0_and_watch_finishes(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    task = make_task(tmp_path / "t", GATED_TASK.replace("GATE", repr(str(gate))))
    proc = cli.start("submit", str(task), "--shards", "2", "--workers", "2")
    wait_for(lambda: cli.running_attempts(), 30, "a shard to start")
    proc.send_signal(signal.SIGINT)  # the shards cannot end before the gate opens
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # a detach on purpose is not a failure
    run_id = out.strip()
    assert "detached" in err and f"runner watch {run_id}" in err
    gate.touch()
    watched = cli("watch", run_id)  # the workers kept going without the runner
    assert watched.code == 0, watched.stderr
    assert "2/2 shards succeeded" in watched.stderr


def _publishing(cli: Cli) -> bool:
    """Whether the store's one run is being published (some of its shards, not all, out)."""
    for path in cli.store.glob("runs/*/run.json"):
        with contextlib.suppress(ValueError, OSError):
            manifest = json.loads(path.read_text())
            return 0 < (manifest.get("published") or 0) < manifest["shard_count"]
    return False


def test_ctrl_c_while_publishing_says_what_publishes_the_rest(cli: Cli, tmp_path: Path) -> None:
    """It said "goes on", and the run stalled with most of its shards never published:
    nothing but a `runner watch` publishes them."""
    task = make_task(tmp_path / "t", OK_TASK)
    proc = cli.start("submit", str(task), "--shards", "200000", "--workers", "1")
    wait_for(lambda: _publishing(cli), 60, "publishing to begin")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    run_id = out.strip()
    said = re.search(rf"run {run_id} goes on with (\d+) of its 200000 shards published", err)
    assert said is not None and int(said[1]) < 200000, err
    assert f"`runner watch {run_id}` publishes the rest" in err
    assert cli("cancel", run_id).code == 0


def test_dry_run_lists_shards_and_starts_nothing(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", OK_TASK)
    r = cli("submit", str(task), "--shards", "3", "--workers", "2", "--dry-run")
    assert r.code == 0, r.stderr
    assert r.stdout.splitlines() == [
        '00000\t{"index": 0}',
        '00001\t{"index": 1}',
        '00002\t{"index": 2}',
    ]
    assert "dry run: 3 shards; bundle" in r.stderr and "up to 2 workers x 1 slots" in r.stderr
    assert not cli.store.exists()


def test_a_big_bundle_is_named_and_cflowignore_keeps_files_out(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", OK_TASK)
    (task / "data").mkdir()
    (task / "data" / "huge.bin").write_bytes(os.urandom(21 * 1024 * 1024))
    r = cli("submit", str(task), "--shards", "1", "--dry-run")
    assert r.code == 0, r.stderr
    assert "warning: the task bundle is" in r.stderr and "data/huge.bin (21.0 MB)" in r.stderr
    (task / ".cflowignore").write_text("data/\n")
    r = cli("submit", str(task), "--shards", "1", "--dry-run")
    assert "warning" not in r.stderr and "(2 files)" in r.stderr


def _queued(cli: Cli, run_id: str) -> int:
    with sqlite3.connect(cli.store / "queue.db") as db:
        (n,) = db.execute("SELECT COUNT(*) FROM messages WHERE run_id = ?", (run_id,)).fetchone()
    return int(n)


def test_rm_and_prune_delete_runs_queue_entries_and_unused_bundles(
    cli: Cli, tmp_path: Path
) -> None:
    ok = make_task(tmp_path / "ok", OK_TASK)
    other = make_task(tmp_path / "other", OK_TASK + "\n# another bundle\n")
    a = cli("submit", str(ok), "--shards", "2").run_id
    b = cli("submit", str(ok), "--shards", "2").run_id  # same bundle as a
    c = cli("submit", str(other), "--shards", "2").run_id
    bundles = {p.name for p in (cli.store / "tasks").iterdir()}
    assert len(bundles) == 2
    slow = make_task(tmp_path / "slow", SLOW_TASK)
    d = cli("submit", str(slow), "--shards", "50", "--workers", "1", "--detach").run_id
    assert _queued(cli, d) > 0
    going = cli("rm", d)
    assert going.code == 2 and "still going" in going.stderr
    forced = cli("rm", d, "--force")
    assert forced.code == 0, forced.stderr
    assert forced.stdout.split() == [d] and _queued(cli, d) == 0
    assert not (cli.store / "runs" / d).exists()
    assert "1 unused bundles" in forced.stderr  # only d used the slow task's bundle
    assert {p.name for p in (cli.store / "tasks").iterdir()} == bundles
    rm = cli("rm", a)
    assert rm.code == 0 and not (cli.store / "runs" / a).exists()
    assert {p.name for p in (cli.store / "tasks").iterdir()} == bundles  # b still uses it
    # Age c's run by a week and prune.
    manifest = cli.store / "runs" / c / "run.json"
    data = json.loads(manifest.read_text())
    data["created_at"] -= 8 * 86400
    manifest.write_text(json.dumps(data))
    dry = cli("prune", "--older-than", "7d", "--dry-run")
    assert dry.stdout.split() == [c] and (cli.store / "runs" / c).exists()
    pruned = cli("prune", "--older-than", "7d")
    assert pruned.code == 0 and pruned.stdout.split() == [c]
    assert "1 unused bundles" in pruned.stderr
    assert [r["run_id"] for r in json.loads(cli("runs", "--json").stdout)] == [b]
    assert len(list((cli.store / "tasks").iterdir())) == 1
    bad = cli("prune", "--older-than", "soon")
    assert bad.code == 2 and "is not an age" in bad.stderr


def _lifetimes(store: Path) -> dict[str, str | None]:
    """Worker name -> the run its lifetime record names."""
    return {
        p.parent.name: json.loads(p.read_text()).get("run")
        for p in (store / "fleet").glob("*/lifetime.json")
    }


def test_rm_takes_the_logs_and_lifetime_records_of_its_runs_workers(
    cli: Cli, tmp_path: Path
) -> None:
    """A local worker serves one run, and its lifetime record names it: when the run goes, its
    workers' log and record go too (a store a notebook maps into for months would otherwise keep
    two files a map for good). A worker registered live, and a record naming no run (a VM's,
    which serves every run), stay; a live one's go with a later removal once it is not."""
    ok = make_task(tmp_path / "ok", OK_TASK)
    a, b, c = (cli("submit", str(ok), "--shards", "2", "--workers", "1").run_id for _ in "abc")
    before = _lifetimes(cli.store)
    workers = {run: {name for name, r in before.items() if r == run} for run in (a, b, c)}
    assert all(workers.values()) and set(before.values()) == {a, b, c}, before
    logs = cli.store / "fleet" / "logs"
    assert all((logs / f"{name}.log").exists() for name in before)
    # b's worker still registered live (as a run being made has its workers), and a record
    # that names no run: both kept.
    (live,) = sorted(workers[b])
    (cli.store / "fleet" / "live" / f"{live}.json").write_text(json.dumps({"pid": 1, "run": b}))
    (cli.store / "fleet" / "vm-7").mkdir()
    (cli.store / "fleet" / "vm-7" / "lifetime.json").write_text(json.dumps({"worker": "vm-7"}))
    gone = cli("rm", a, b)
    assert gone.code == 0, gone.stderr
    assert f"{len(workers[a])} workers' logs went with their runs" in gone.stderr
    assert set(_lifetimes(cli.store)) == workers[c] | {live, "vm-7"}
    assert not any((logs / f"{name}.log").exists() for name in workers[a])
    assert not any((cli.store / "fleet" / name).exists() for name in workers[a])
    assert all((logs / f"{name}.log").exists() for name in workers[c] | {live})
    # No longer live: the next removal takes it, with its own run's.
    (cli.store / "fleet" / "live" / f"{live}.json").unlink()
    last = cli("rm", c)
    assert f"{len(workers[c]) + 1} workers' logs went with their runs" in last.stderr
    assert set(_lifetimes(cli.store)) == {"vm-7"}


def test_rm_takes_the_empty_logs_of_workers_stopped_before_they_began(
    cli: Cli, tmp_path: Path
) -> None:
    """A submit whose task cannot start stops the workers it started early: one stopped
    before its agent began leaves an empty log and no lifetime record, so none goes with a run.
    A later removal takes those a minute old (and one whose agent had begun, naming the run
    that was never made, goes with it); a log that says something (a worker that crashed as it
    started) stays, as does an empty one just made (a worker starting now)."""
    ok = make_task(tmp_path / "ok", OK_TASK)
    kept = cli("submit", str(ok), "--shards", "2", "--workers", "1").run_id
    gone = cli("submit", str(ok), "--shards", "2", "--workers", "1").run_id
    logs = cli.store / "fleet" / "logs"
    before = {p.stem for p in logs.glob("*.log")}
    broken = make_task(tmp_path / "broken", "import no_such_module\n\ndef run(shard):\n    pass\n")
    assert cli("submit", str(broken), "--shards", "4").code == 2
    refused = {p.stem for p in logs.glob("*.log")} - before
    assert refused, "the refused submit started no worker early"
    assert not any((cli.store / "fleet" / "live" / f"{n}.json").exists() for n in refused)
    stopped, crashed, starting = (
        logs / "local-900.log",
        logs / "local-901.log",
        logs / "local-902.log",
    )
    stopped.touch()  # as a worker stopped before it began leaves it
    crashed.write_text("Traceback (most recent call last):\n  ...\nMemoryError\n")
    starting.touch()
    hour_ago = time.time() - 3600
    for log in [stopped, crashed, *(logs / f"{name}.log" for name in refused)]:
        os.utime(log, (hour_ago, hour_ago))
    empty = 1 + sum(1 for name in refused if not (logs / f"{name}.log").stat().st_size)
    removed = cli("rm", gone)
    assert removed.code == 0, removed.stderr
    assert f"{empty} empty logs of workers stopped before they began" in removed.stderr
    assert not stopped.exists()
    assert not any((logs / f"{name}.log").exists() for name in refused)
    assert crashed.exists() and starting.exists()
    assert all((logs / f"{name}.log").exists() for name, run in _lifetimes(cli.store).items()
               if run == kept)  # fmt: skip
