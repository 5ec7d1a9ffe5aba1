"""The default --halt rule through the CLI, on a task whose every shard fails the same way with a
message that names its own file: a wrong path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_inputs, make_task

pytestmark = pytest.mark.e2e

SHARDS = 24
# A wrong path: each shard opens its input's name under a folder that does not exist.
WRONG_PATH = """
from pathlib import Path

def run(shard):
    Path("/nonexistent/data", Path(shard.input).name).read_text()
"""
EXAMPLE = re.compile(
    r"halted: the first 3 attempts all failed with: FileNotFoundError: \[Errno 2\] "
    r"No such file or directory: '/nonexistent/data/part-000\d\d\.csv'"
)


def test_a_wrong_path_halts_the_run_after_the_first_three_attempts(
    cli: Cli, tmp_path: Path
) -> None:
    make_inputs(tmp_path / "data", [f"part-{n:05d}.csv" for n in range(SHARDS)])
    task = make_task(tmp_path / "wrongpath", WRONG_PATH)
    r = cli("submit", str(task), "--inputs", str(tmp_path / "data" / "*.csv"), "--workers", "2")
    assert r.code == 1, r.stderr
    # One real reason, as the task raised it, not its masked form.
    shown = EXAMPLE.search(r.stderr)
    assert shown is not None, r.stderr
    assert "<path>" not in r.stderr and "<n>" not in r.stderr
    status = cli.status(r.run_id)
    assert status["state"] == "cancelled"
    assert EXAMPLE.search("halted: " + status["halted"]) is not None, status["halted"]
    # Every attempt failed with its own file's name; the rule saw them as one reason and
    # stopped the run long before its 3 attempts of each of the 24 shards.
    reasons = {
        a["reason"]
        for s in status["shards"]
        for a in s["attempts"]
        if (a["reason"] or "").startswith("FileNotFoundError")
    }
    assert len(reasons) >= 3, reasons
    attempts = sum(len(s["attempts"]) for s in status["shards"])
    assert attempts < SHARDS, attempts
    assert status["counts"]["cancelled"] > 0
