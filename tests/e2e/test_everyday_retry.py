"""Fix and retry through the CLI: reasons shown, retry with a fixed task, logs that wait."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task, wait_for

pytestmark = pytest.mark.e2e

BROKEN = """
from pathlib import Path

def run(shard):
    if shard.index == 2:
        raise ValueError("bad row 7 in shard 2")
    (Path(shard.output_dir) / "v.txt").write_text(f"v1 {shard.index}\\n")
"""

FIXED = """
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "v.txt").write_text(f"v2 {shard.index}\\n")
"""


def _manifest(cli: Cli, run_id: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((cli.store / "runs" / run_id / "run.json").read_text())
    return data


def test_retry_with_a_fixed_task_reruns_only_the_failed_shards(cli: Cli, tmp_path: Path) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli("submit", str(broken), "--shards", "4", "--workers", "2", "--max-attempts", "2")
    assert r.code == 1, r.stderr
    run_id = r.run_id
    first = _manifest(cli, run_id)
    failed = cli("status", run_id, "--state", "failed", "--json")
    shards = json.loads(failed.stdout)["shards"]
    assert [s["index"] for s in shards] == [2]
    reason = shards[0]["reason"]
    assert reason and f"failed {shards[0]['id']}: {reason}" in r.stderr  # shown in the summary
    committed = cli.records(f"runs/{run_id}/shards/*/result.json")
    assert len(committed) == 3

    fixed = make_task(tmp_path / "fixed", FIXED)
    again = cli("retry", run_id, "--failed", "--task", str(fixed))
    assert again.code == 0, again.stderr
    assert "retrying 1 shards" in again.stderr and "with bundle" in again.stderr
    after_retry = cli.records(f"runs/{run_id}/shards/*/result.json")
    assert {k: after_retry[k] for k in committed} == committed  # committed shards untouched
    after = _manifest(cli, run_id)
    history = after["bundles"]
    assert isinstance(history, list) and len(history) == 2
    assert history[0]["sha256"] == first["bundle"] and history[1]["sha256"] == after["bundle"]
    assert history[1]["shards"] == 1 and after["bundle"] != first["bundle"]
    combined = (cli.store / "runs" / run_id / "combined" / "v.txt").read_text().splitlines()
    assert combined == ["v1 0", "v1 1", "v2 2", "v1 3"]  # committed shards kept their result
    status = cli.status(run_id)
    assert status["counts"]["succeeded"] == 4
    nothing = cli("retry", run_id, "--failed")
    assert nothing.code == 0 and "nothing to retry" in nothing.stderr


def test_the_reason_is_the_exceptions_last_line(cli: Cli, tmp_path: Path) -> None:
    broken = make_task(tmp_path / "broken", BROKEN)
    r = cli("submit", str(broken), "--shards", "4", "--workers", "2", "--max-attempts", "1")
    assert r.code == 1, r.stderr  # one shard failed for good
    assert "ValueError: bad row 7 in shard 2" in r.stderr
    table = cli("status", r.run_id)
    assert "ValueError: bad row 7 in shard 2" in table.stdout


def test_logs_of_a_missing_attempt_is_an_error(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def run(shard):\n    print('hello from', shard.id)\n")
    r = cli("submit", str(task), "--shards", "1")
    assert r.code == 0, r.stderr
    ok = cli("logs", r.run_id, "--shard", "00000", "--attempt", "1")
    assert ok.code == 0 and "hello from 00000" in ok.stdout
    missing = cli("logs", r.run_id, "--shard", "00000", "--attempt", "9")
    assert missing.code == 2
    assert missing.stderr.strip() == "error: shard 00000 has no attempt 9 (its attempts: 1)"


def test_logs_follow_waits_for_a_queued_shard(cli: Cli, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    task = make_task(
        tmp_path / "t",
        f"""
        import os, time

        def run(shard):
            while shard.index == 0 and not os.path.exists({str(gate)!r}):
                time.sleep(0.02)  # the one worker stays on shard 0 until the test lets go
            print("shard", shard.index, "ran", flush=True)
        """,
    )
    r = cli("submit", str(task), "--shards", "2", "--workers", "1", "--detach")
    assert r.code == 0, r.stderr
    not_yet = cli("logs", r.run_id, "--shard", "00001")
    assert not_yet.code == 2 and "has not started yet" in not_yet.stderr
    follower = cli.start("logs", r.run_id, "--shard", "00001", "--follow")
    assert follower.stderr is not None
    said = ""
    while "waiting for it to start" not in said:  # it says it waits before it does
        line = follower.stderr.readline()
        assert line, f"logs --follow ended without waiting: {said}"
        said += line
    assert not cli.records(f"runs/{r.run_id}/shards/00001/attempts/*/status.json")
    gate.touch()
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, said + err
    assert "shard 1 ran" in out
    wait_for(lambda: cli.status(r.run_id)["counts"]["succeeded"] == 2, 30, "the run to end")
