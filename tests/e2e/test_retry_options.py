"""`runner retry` changes what the retried shards are allowed: `--timeout` and `--max-attempts`
apply from the retry on, so a run that failed for want of time or tries can be finished."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task

pytestmark = pytest.mark.e2e

# Sleeps a little longer than the first run allows.
SLOW = """
import time
from pathlib import Path

def run(shard):
    time.sleep(2)
    (Path(shard.output_dir) / "v.txt").write_text(f"{shard.index}\\n")
"""

# Fails its first two attempts of each shard, then succeeds.
FLAKY = """
from pathlib import Path

def run(shard):
    if shard.attempt <= 2:
        raise RuntimeError(f"not yet (attempt {shard.attempt})")
    (Path(shard.output_dir) / "v.txt").write_text(f"{shard.index}\\n")
"""


def _combined(cli: Cli, run_id: str) -> list[str]:
    return sorted((cli.store / "runs" / run_id / "combined" / "v.txt").read_text().split())


def test_retry_with_a_longer_timeout_finishes_what_timed_out(tmp_path: Path, cli: Cli) -> None:
    task = make_task(tmp_path / "slow", SLOW)
    first = cli(
        "submit", str(task), "--shards", "2", "--workers", "2", "--timeout", "1",
        "--max-attempts", "1", "--halt", "never",
    )  # fmt: skip
    assert first.code == 1, first.stderr
    reasons = {s["reason"] for s in cli.status(first.run_id)["shards"]}
    assert reasons == {"timed out after 1s"}
    again = cli("retry", first.run_id, "--failed", "--timeout", "1m")
    assert again.code == 0, again.stderr
    assert _combined(cli, first.run_id) == ["0", "1"]


def test_retry_with_more_attempts_finishes_a_flaky_task(tmp_path: Path, cli: Cli) -> None:
    task = make_task(tmp_path / "flaky", FLAKY)
    first = cli(
        "submit", str(task), "--shards", "2", "--workers", "2", "--max-attempts", "1",
        "--halt", "never",
    )  # fmt: skip
    assert first.code == 1, first.stderr
    again = cli("retry", first.run_id, "--failed", "--max-attempts", "2")
    assert again.code == 0, again.stderr  # attempts 2 fail, 3 succeed: two failures allowed
    assert _combined(cli, first.run_id) == ["0", "1"]
    shards = cli.status(first.run_id)["shards"]
    # Each attempt's state and reason when not: once beside a CPU-bound loop a shard had four.
    assert {len(s["attempts"]) for s in shards} == {3}, [s["attempts"] for s in shards]


def test_a_bad_retry_option_is_one_line(tmp_path: Path, cli: Cli) -> None:
    task = make_task(tmp_path / "slow", SLOW)
    first = cli("submit", str(task), "--shards", "1", "--timeout", "1", "--max-attempts", "1")
    assert first.code == 1
    bad = cli("retry", first.run_id, "--failed", "--timeout", "soon")
    assert bad.code == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--timeout" in bad.stderr
