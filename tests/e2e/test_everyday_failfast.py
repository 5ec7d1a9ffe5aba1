"""Fail fast through the CLI: checks before publishing, and the --halt rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task

pytestmark = pytest.mark.e2e


def _attempts(cli: Cli, run_id: str) -> int:
    return len(cli.records(f"runs/{run_id}/shards/*/attempts/*/status.json"))


@pytest.mark.parametrize(
    ("body", "name", "expected"),
    [
        (
            "import no_such_module_here\n\ndef run(shard):\n    pass\n",
            "task.py",
            "cannot start: ModuleNotFoundError: No module named 'no_such_module_here'",
        ),
        ("def run(shard, extra):\n    pass\n", "task.py", "must take exactly one argument"),
        ("def run(shard):\n    return (\n", "task.py", "has a syntax error at line"),
        ("def run():\n    pass\n", "task.py", "must take exactly one argument"),
        ("raise RuntimeError('no config')\ndef run(shard):\n    pass\n", "task.py", "no config"),
        ("#!/bin/bash\nif then fi\n", "task.sh", "has a syntax error"),
    ],
    ids=["import", "two-args", "syntax", "no-args", "module-raises", "shell-syntax"],
)
def test_a_task_that_cannot_start_is_refused_before_publishing(
    cli: Cli, tmp_path: Path, body: str, name: str, expected: str
) -> None:
    task = make_task(tmp_path / "t", body, name=name)
    r = cli("submit", str(task), "--shards", "100")
    assert r.code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert r.stdout == "" and not cli.store.exists()  # no run, no queue, nothing paid for
    # the workers that booted while the import check ran are gone with it
    store = str(cli.store)
    left = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and store.encode() in _cmdline(pid) and b"worker" in _cmdline(pid)
    ]
    assert not left, f"workers left running: {left}"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize(
    ("ignored", "expected"),
    [
        ("*.py\n", ".cflowignore leaves task.py out of the bundle"),
        ("helper.py\n", "No module named 'helper'"),
    ],
    ids=["entry", "helper"],
)
def test_a_task_its_cflowignore_breaks_is_refused_before_publishing(
    cli: Cli, tmp_path: Path, ignored: str, expected: str
) -> None:
    """What .cflowignore leaves out is checked as the workers get it: the task itself, or a
    module it imports (the import check read the folder, so every attempt failed instead)."""
    task = make_task(tmp_path / "t", "from helper import h\n\ndef run(shard):\n    h()\n")
    (task / "helper.py").write_text("def h():\n    pass\n")
    (task / ".cflowignore").write_text(ignored)
    r = cli("submit", str(task), "--shards", "2")
    assert r.code == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not cli.store.exists()


def test_the_first_attempts_failing_alike_halt_the_run(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        def run(shard):
            raise ValueError("the input format changed")
        """,
    )
    r = cli("submit", str(task), "--shards", "100", "--workers", "2")
    assert r.code == 1, r.stderr
    assert f"run {r.run_id} halted: the first 3 attempts all failed with:" in r.stderr
    assert "retry" in r.stderr and "--task" in r.stderr
    # Far from the 300 attempts the run would have burnt; the poll pace bounds the overshoot.
    assert _attempts(cli, r.run_id) < 100
    status = cli.status(r.run_id)
    assert status["state"] == "cancelled" and status["halted"].startswith("the first 3 attempts")
    assert status["counts"]["cancelled"] + status["counts"]["failed"] == 100
    assert "running" not in {s["state"] for s in status["shards"]}
    runs = json.loads(cli("runs", "--json").stdout)
    assert runs[0]["halted"] == status["halted"]


def test_a_requirement_that_does_not_install_halts_the_run(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def run(shard):\n    pass\n")
    (task / "requirements.txt").write_text("this is not ]] a requirement\n")
    r = cli("submit", str(task), "--shards", "50", "--workers", "2")
    assert r.code == 1, r.stderr
    assert "import check skipped: the task has requirements.txt" in r.stderr
    assert "halted: the first 3 attempts all failed with:" in r.stderr
    assert "requirements.txt failed" in r.stderr  # the error's own line, in the summary
    assert _attempts(cli, r.run_id) < 50


def test_halt_never_and_now(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        def run(shard):
            if shard.index % 2:
                raise ValueError(f"odd shard {shard.index}")
        """,
    )
    never = cli("submit", str(task), "--shards", "4", "--workers", "2", "--halt", "never")
    assert never.code == 1 and "halted" not in never.stderr
    assert "2/4 shards succeeded, 2 failed" in never.stderr
    assert _attempts(cli, never.run_id) == 2 + 2 * 3
    now = cli(
        "submit", str(task), "--shards", "40", "--workers", "1", "--halt", "now,fail=1",
        "--max-attempts", "1",
    )  # fmt: skip
    assert now.code == 1 and "halted: 1 attempts failed (--halt now,fail=1)" in now.stderr


def test_a_bad_halt_rule_is_one_line(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def run(shard):\n    pass\n")
    r = cli("submit", str(task), "--shards", "1", "--halt", "soon")
    assert r.code == 2
    assert r.stderr.strip().splitlines() == [
        "error: --halt 'soon' is not a rule; use never, same,fail=N or now,fail=N (N >= 1)"
    ]
