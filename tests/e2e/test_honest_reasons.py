"""Through the CLI, with real workers: a failure says what happened to the attempt, a valid task
runs however it binds ``run``, its return value is kept, and bad input is one line before
anything runs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Cli, make_task, wait_for
from tests.prerequisites import missing
from worker.agent.caller import process_start

pytestmark = pytest.mark.e2e

# Each shard fails its own way; the task prints first, so the last printed line is never
# mistaken for the reason.
PY_FAILURES = """
import os, signal, time

def run(shard):
    what = shard.params["do"]
    print("starting", what, flush=True)
    if what == "hang":
        time.sleep(300)
    elif what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif what == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif what == "raise":
        raise ValueError("bad row 7")
"""

SH_FAILURES = """
#!/usr/bin/env bash
set -euo pipefail
echo "working on $CFLOW_SHARD_INDEX"
case "$CFLOW_SHARD_INDEX" in
  0) sleep 300 ;;
  1) kill -9 $$ ;;
  2) bash -c 'kill -9 $$' ;;
  3) echo "no such table: users" >&2; exit 3 ;;
esac
"""


def _params(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reasons(cli: Cli, run_id: str) -> dict[str, str]:
    return {s["id"]: s["reason"] for s in cli.status(run_id)["shards"]}


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolate"])
def test_a_python_failure_says_what_ended_it(cli: Cli, tmp_path: Path, isolate: bool) -> None:
    task = make_task(tmp_path / "t", PY_FAILURES)
    ways = ["hang", "kill", "segv", "raise"]
    params = _params(tmp_path / "p.jsonl", [{"do": w} for w in ways])
    args = ["--params", str(params), "--workers", "2", "--timeout", "2", "--max-attempts", "1"]
    r = cli("submit", str(task), *args, "--halt", "never", *(["--isolate"] * isolate))
    assert r.code == 1, r.stderr
    reasons = _reasons(cli, r.run_id)
    assert reasons == {
        "00000": "timed out after 2s",
        "00001": "killed by SIGKILL (out of memory?)",
        "00002": "killed by SIGSEGV",
        "00003": "ValueError: bad row 7",
    }
    for shard, reason in reasons.items():
        assert f"failed {shard}: {reason}" in r.stderr  # the summary says the same
    table = cli("status", r.run_id)
    assert "timed out after 2s" in table.stdout and "killed by SIGKILL" in table.stdout
    log = cli("logs", r.run_id, "--shard", "00000")
    assert "starting hang" in log.stdout  # the printed line is still in the log


def test_a_shell_failure_says_what_ended_it(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", SH_FAILURES, name="task.sh")
    args = ["--shards", "4", "--workers", "2", "--timeout", "2", "--max-attempts", "1"]
    r = cli("submit", str(task), *args, "--halt", "never")
    assert r.code == 1, r.stderr
    reasons = _reasons(cli, r.run_id)
    killed_child = reasons.pop("00002")
    assert reasons == {
        "00000": "timed out after 2s",
        "00001": "killed by SIGKILL (out of memory?)",
        "00003": "no such table: users",  # a shell task's own error: its last line
    }
    said = "exited with code 137, as a shell does when a command it ran was killed by SIGKILL"
    assert killed_child.startswith(f"{said} (out of memory?); its last line: ")
    last = killed_child.rsplit("; its last line: ", 1)[1]
    assert "Killed" in last and "bash -c 'kill -9 $$'" in last  # bash's own line, kept


def test_a_crlf_task_sh_is_refused_and_its_error_keeps_the_carriage_return(
    cli: Cli, tmp_path: Path
) -> None:
    task = tmp_path / "t"
    task.mkdir()
    (task / "task.sh").write_bytes(b"#!/usr/bin/env bash\r\nset -euo pipefail\r\necho hi\r\n")
    r = cli("submit", str(task), "--shards", "1")
    assert r.code == 2 and not cli.store.exists()
    (line,) = r.stderr.strip().splitlines()
    assert "CRLF" in line and "sed -i 's/\\r$//'" in line and "dos2unix" in line
    # Let through with --no-check, the attempt's reason keeps what came before the \r.
    r = cli("submit", str(task), "--shards", "1", "--no-check", "--max-attempts", "1")
    assert r.code == 1, r.stderr
    (reason,) = _reasons(cli, r.run_id).values()
    assert "set: pipefail\\r: invalid option name" in reason


def test_valid_tasks_run_however_they_bind_run(cli: Cli, tmp_path: Path) -> None:
    helpers = "def helper(shard):\n    (shard.output_dir / 'o.txt').write_text(shard.id + '\\n')\n"
    tasks = {
        "imported": "from impl import helper as run\n",
        "partial": "import functools\nfrom impl import helper\n"
        "def _run(shard, then):\n    then(shard)\n"
        "run = functools.partial(_run, then=helper)\n",
        "conditional": "import sys\nfrom impl import helper\n"
        "if sys.version_info >= (3, 8):\n    def run(shard):\n        helper(shard)\n",
    }
    for name, source in tasks.items():
        folder = make_task(tmp_path / name, source)
        (folder / "impl.py").write_text(helpers)
        r = cli("submit", str(folder), "--shards", "2")
        assert r.code == 0, (name, r.stderr)
        combined = cli.store / "runs" / r.run_id / "combined" / "o.txt"
        assert combined.read_text().split() == ["00000", "00001"], name


def test_no_check_lets_the_task_fail_on_the_workers_instead(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def helper(shard):\n    pass\n")
    refused = cli("submit", str(task), "--shards", "1")
    assert refused.code == 2 and "no top-level run" in refused.stderr
    r = cli("submit", str(task), "--shards", "1", "--no-check", "--max-attempts", "1")
    assert r.code == 1 and "task checks skipped (--no-check)" in r.stderr
    (reason,) = _reasons(cli, r.run_id).values()
    assert "has no attribute 'run'" in reason


SCRIPT_EXITS = """
import sys
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "o.txt").write_text("ran")

def main():
    print("script mode")

sys.exit(main())
"""


def test_a_task_that_exits_as_it_is_imported_is_refused_and_fails_on_the_workers(
    cli: Cli, tmp_path: Path
) -> None:
    """``sys.exit(main())`` at a script's end, no ``__main__`` guard: every shard
    "succeeded" with no output, run() never called (the exit was taken for the process's)."""
    task = make_task(tmp_path / "t", SCRIPT_EXITS)
    refused = cli("submit", str(task), "--shards", "2")
    assert refused.code == 2 and "sys.exit(None) as it was imported" in refused.stderr
    for isolate in ([], ["--isolate"]):
        r = cli("submit", str(task), "--shards", "2", "--no-check", "--halt", "never", *isolate)
        assert r.code == 1, r.stderr
        reasons = set(_reasons(cli, r.run_id).values())
        assert len(reasons) == 1 and "run(shard) never ran" in reasons.pop(), reasons


MESSAGES = """
class Multi(Exception):
    pass

def run(shard):
    if shard.index == 0:
        raise Multi("line one\\nline two\\nline three")
    if shard.index == 1:
        raise ValueError("bad thing \\r carriage")
    if shard.index == 3:
        compile("def (:\\n  pass", "<gen>", "exec")
    if shard.index == 4:
        raise ValueError("\\x1b[31mred\\x1b[0m")
    if shard.index == 5:
        raise ValueError("\\n\\nafter blanks")
    noted = KeyError("k")
    noted.add_note("a note")
    raise noted
"""


@pytest.mark.parametrize("isolate", [[], ["--isolate"]], ids=["warm", "isolate"])
def test_a_failure_of_several_lines_is_said_by_its_first(
    cli: Cli, tmp_path: Path, isolate: list[str]
) -> None:
    """The reason was the message's last line (``line three``, a note, what followed a
    carriage return): the exception's type and what it said were lost."""
    task = str(make_task(tmp_path / "t", MESSAGES))
    r = cli("submit", task, "--shards", "6", "--max-attempts", "1", "--halt", "never", *isolate)
    assert r.code == 1, r.stderr
    assert sorted(_reasons(cli, r.run_id).values()) == [
        "KeyError: 'k' (+1 more line in the log)",
        "SyntaxError: invalid syntax",  # not the line before it: where it was
        "ValueError: \\x1b[31mred\\x1b[0m",  # a colour code in a reason is shown, not obeyed
        "ValueError: after blanks",
        "ValueError: bad thing \\r carriage",
        "task.Multi: line one (+2 more lines in the log)",
    ]


@pytest.mark.parametrize("isolate", [[], ["--isolate"]], ids=["warm", "isolate"])
def test_a_task_whose_import_hangs_is_timed_out_and_cancelled_as_its_shard_is(
    cli: Cli, tmp_path: Path, isolate: list[str]
) -> None:
    """The worker waited for its task host to say the task loaded with no time limit: an
    import that hung held the shard running for ever, past --timeout, through a cancel, and
    the worker with it."""
    task = str(
        make_task(tmp_path / "t", "import time\ntime.sleep(600)\n\ndef run(shard):\n    pass\n")
    )
    flags = ["--shards", "2", "--workers", "1", "--no-check", "--halt", "never", *isolate]
    r = cli("submit", task, "--timeout", "2", "--max-attempts", "1", *flags)
    assert r.code == 1, r.stderr
    assert set(_reasons(cli, r.run_id).values()) == {"timed out after 2s importing task.py"}
    watch = cli.start("submit", task, *flags)
    try:
        run_id = wait_for(lambda: next(iter(_running(cli)), None), 60, "a shard to start")
        assert cli("cancel", run_id).code == 0
        assert watch.wait(60) == 1
    finally:
        watch.kill()
    pids = cli.workers().values()
    wait_for(lambda: all(process_start(p) is None for p in pids), 30, "its worker to go")


def _running(cli: Cli) -> list[str]:
    """Runs with an attempt running."""
    runs = (cli.store / "runs").iterdir() if (cli.store / "runs").exists() else []
    return [r.name for r in runs if cli.status(r.name)["counts"].get("running")]


@pytest.mark.parametrize("isolate", [[], ["--isolate"]], ids=["warm", "isolate"])
def test_a_task_process_that_exits_0_mid_shard_fails_saying_so(
    cli: Cli, tmp_path: Path, isolate: list[str]
) -> None:
    """run(shard) never returned: a failure in either mode (a warm host's said "code 1", an
    isolated shard's child counted as a success)."""
    body = "import os\n\ndef run(shard):\n    os._exit(0)\n"
    task = str(make_task(tmp_path / "t", body))
    r = cli("submit", task, "--shards", "1", "--halt", "never", *isolate)
    assert r.code == 1
    (reason,) = _reasons(cli, r.run_id).values()
    assert reason.startswith("the task's process exited with code 0 mid-shard"), reason


RETURNS = """
def run(shard):
    i = shard.params["index"]
    if i == 2:
        return None
    return {"index": i, "squares": [i * i, i ** 3]}
"""


@pytest.mark.parametrize("isolate", [False, True], ids=["warm", "isolate"])
def test_runs_return_value_is_kept_as_the_shards_result(
    cli: Cli, tmp_path: Path, isolate: bool
) -> None:
    task = make_task(tmp_path / "t", RETURNS)
    r = cli("submit", str(task), "--shards", "3", "--workers", "2", *(["--isolate"] * isolate))
    assert r.code == 0, r.stderr
    shards = cli.status(r.run_id)["shards"]
    assert [s["value"] for s in shards] == [
        {"index": 0, "squares": [0, 0]},
        {"index": 1, "squares": [1, 1]},
        None,
    ]
    records = cli.records(f"runs/{r.run_id}/shards/*/result.json")
    assert records[f"runs/{r.run_id}/shards/00001/result.json"]["value"]["index"] == 1
    assert not (cli.store / "runs" / r.run_id / "combined").exists()  # not taken for an output


def test_a_return_value_that_is_not_json_fails_the_attempt_saying_so(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(
        tmp_path / "t", "import pathlib\ndef run(shard):\n    return pathlib.Path('x')\n"
    )
    r = cli("submit", str(task), "--shards", "1", "--max-attempts", "1")
    assert r.code == 1, r.stderr
    (reason,) = _reasons(cli, r.run_id).values()
    assert reason.startswith("TypeError: run(shard) returned a PosixPath, which is not JSON")


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[Path]:
    """``folder``, read-only for this process (root writes through a mode: mount it read-only)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        missing(f"cannot bind-mount a folder read-only here: {bind.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_bad_input_is_one_line_and_exit_2_before_anything_runs(cli: Cli, tmp_path: Path) -> None:
    body = "def run(shard):\n    (shard.output_dir / 'o.txt').write_text('x\\n')\n"
    task = make_task(tmp_path / "ro" / "task", body)  # in the folder made read-only below
    with _read_only(tmp_path / "ro") as ro:
        work = Cli(ro)  # run from a read-only working folder: its store cannot be made
        for extra in ([], ["--dry-run"]):
            r = work("submit", str(task), "--shards", "1", *extra)
            assert r.code == 2, (extra, r.stderr)
            (line,) = r.stderr.strip().splitlines()
            assert line.startswith(f"error: the store {ro}/.cflow: {ro} is not writable (")
            assert line.endswith("; pass --store DIR or set CFLOW_STORE")
        for out in ("/proc/cflow-results", str(ro / "results")):
            r = cli("submit", str(task), "--shards", "1", "--out", out)
            assert r.code == 2, (out, r.stderr)
            (line,) = r.stderr.strip().splitlines()
            assert line.startswith(f"error: --out {out}: ") and "is not writable" in line
        both = make_task(tmp_path / "both", "def run(shard):\n    pass\n")
        (both / "task.sh").write_text("echo hi\n")
        r = cli("submit", str(both), "--shards", "1")
        assert r.code == 2
        assert r.stderr.strip().splitlines() == [
            f"error: task folder {both} has both task.py and task.sh; a task is one of them:"
            " remove (or rename) the one that should not run"
        ]
        assert not cli.store.exists() and list(ro.iterdir()) == [task]  # nothing was made
        # A read-only task folder is no bad input: the task runs from its bundle.
        r = cli("submit", str(task), "--shards", "1")
        assert r.code == 0, r.stderr
        assert (cli.store / "runs" / r.run_id / "combined" / "o.txt").read_text() == "x\n"
