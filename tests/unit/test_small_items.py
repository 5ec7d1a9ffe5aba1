"""Smaller promises of the everyday commands: ``--timeout`` with units, ``report --out`` in the
format asked, the run's own elapsed time in a re-attached watch's summary, a task's traceback
that starts at the task's own code, and store files with the user's file mode."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer

from runner.cli.common import duration
from tests.e2e.conftest import Cli, make_task, wait_for
from tests.e2e.conftest import cli as cli  # the fixture of the tests that run the CLI
from worker.backends.local.store import LocalStore
from worker.executors.base import WORKER_PATH

e2e = pytest.mark.e2e

WRITES = """
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "x.txt").write_text(f"{shard.index}\\n")
"""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90.5", 90.5), ("90s", 90), ("15m", 900), ("1h", 3600), ("1h30m", 5400)],
)
def test_durations_with_units(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["1x", "", "1h-5m", "m", "0", "0s", "-5", "inf", "1d2"])
def test_what_is_no_duration_is_refused(text: str) -> None:
    with pytest.raises(typer.BadParameter):
        duration(text)


def test_a_bad_timeout_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    runner = Cli(tmp_path)
    task = make_task(tmp_path / "t", WRITES)
    r = runner("submit", str(task), "--shards", "1", "--timeout", "1x")
    assert r.code == 2 and r.stdout == "" and not runner.store.exists()
    assert r.stderr.splitlines() == [
        "error: Invalid value for '--timeout': '1x' is not a duration; write seconds (90) or"
        " 90s, 15m, 1h, 1h30m (see `runner submit --help`)"
    ]


@e2e
def test_a_timeout_with_units_is_the_runs(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", WRITES)
    r = cli("submit", str(task), "--shards", "1", "--timeout", "1h30m")
    assert r.code == 0, r.stderr
    manifest = json.loads((cli.store / "runs" / r.run_id / "run.json").read_text())
    assert manifest["options"]["timeout"] == 5400


@e2e
def test_report_writes_the_format_asked_or_refuses(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", WRITES)
    run = cli("submit", str(task), "--shards", "2")
    assert run.code == 0, run.stderr
    for suffix, magic in ((".pdf", b"%PDF-"), (".svg", b"<?xml"), (".png", b"\x89PNG")):
        target = tmp_path / f"rep{suffix}"
        r = cli("report", run.run_id, "--out", str(target))
        assert r.code == 0, r.stderr
        assert r.stdout.strip() == str(target)
        assert target.read_bytes().startswith(magic)
    assert not (tmp_path / "rep.png").with_suffix(".html").exists()
    for bad in ("rep", "rep.jpeg"):
        r = cli("report", run.run_id, "--out", str(tmp_path / bad))
        assert r.code == 2 and r.stdout == ""
        assert r.stderr.splitlines() == [
            f"error: report --out {tmp_path / bad}: name a .html (a page with the picture),"
            " .png, .pdf or .svg file"
        ]
    assert sorted(p.name for p in tmp_path.glob("rep*")) == [
        "rep.json",
        "rep.pdf",
        "rep.png",
        "rep.svg",
    ]


SLOW = """
import time
from pathlib import Path

def run(shard):
    Path("{flags}", "started").touch()
    while not Path("{flags}", "go").exists():
        time.sleep(0.05)
    (Path(shard.output_dir) / "x.txt").write_text("1\\n")
"""


def _said_seconds(stderr: str) -> int:
    match = re.search(r"shards succeeded, 0 failed in (?:(\d+)m)?(\d+)s", stderr)
    assert match, stderr
    return int(match.group(1) or 0) * 60 + int(match.group(2))


@e2e
def test_a_reattached_watch_reports_the_runs_time_not_its_own(
    cli: Cli,
    tmp_path: Path,
) -> None:
    flags = tmp_path / "flags"
    flags.mkdir()
    task = make_task(tmp_path / "t", SLOW.replace("{flags}", str(flags)))
    r = cli("submit", str(task), "--shards", "1", "--detach")
    assert r.code == 0, r.stderr
    wait_for(lambda: (flags / "started").exists(), what="the shard to start")
    created = json.loads((cli.store / "runs" / r.run_id / "run.json").read_text())["created_at"]
    time.sleep(3)  # the scenario: the run has gone on for 3 s when the watch attaches
    attached = time.time()
    watch = cli.start("watch", r.run_id)
    (flags / "go").touch()
    _, stderr = watch.communicate(timeout=120)
    ended = time.time()
    assert watch.returncode == 0, stderr
    said = _said_seconds(stderr)
    # The run's time (from its creation) and not the watch's (which began 3 s later).
    assert int(attached - created) <= said <= int(ended - created) + 1
    assert said > ended - attached


@e2e
def test_a_run_that_ended_before_the_watch_reports_its_own_time(
    cli: Cli,
    tmp_path: Path,
) -> None:
    task = make_task(tmp_path / "t", WRITES)
    r = cli("submit", str(task), "--shards", "2", "--detach")
    assert r.code == 0, r.stderr
    wait_for(lambda: cli.status(r.run_id)["counts"]["succeeded"] == 2, what="both shards")
    settled = time.time()
    created = json.loads((cli.store / "runs" / r.run_id / "run.json").read_text())["created_at"]
    time.sleep(3)  # the scenario: the run ended 3 s before anyone watches it
    watched = cli("watch", r.run_id)
    assert watched.code == 0, watched.stderr
    assert _said_seconds(watched.stderr) <= int(settled - created) + 1


FAILS = """
def helper(key):
    return {}[key]


def run(shard):
    helper("missing")
"""


@e2e
@pytest.mark.parametrize("extra", [[], ["--isolate"]], ids=["warm", "isolate"])
def test_a_failed_shards_log_starts_at_the_tasks_own_frames(
    cli: Cli,
    tmp_path: Path,
    extra: list[str],
) -> None:
    task = make_task(tmp_path / "t", FAILS)
    r = cli("submit", str(task), "--shards", "1", "--max-attempts", "1", *extra)
    assert r.code == 1
    log = cli("logs", r.run_id, "--shard", "00000").stdout
    assert log.splitlines()[:5] == [
        "Traceback (most recent call last):",
        '  File "task.py", line 6, in run',
        '    helper("missing")',
        '  File "task.py", line 2, in helper',
        "    return {}[key]",
    ]
    assert log.splitlines()[-1] == "KeyError: 'missing'"
    assert "worker" not in log and "bundles" not in log


def _zygote(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": WORKER_PATH}
    command = [sys.executable, "-m", "worker.executors.zygote", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_a_combine_traceback_keeps_the_tasks_frames_and_causes(tmp_path: Path) -> None:
    folder = make_task(
        tmp_path / "t",
        """
        from lib.helper import parse

        def combine(paths, out):
            try:
                parse("x")
            except ValueError as exc:
                raise RuntimeError("cannot combine") from exc
        """,
    )
    (folder / "lib").mkdir()
    (folder / "lib" / "helper.py").write_text("def parse(text):\n    return int(text)\n")
    listing, error = tmp_path / "inputs.txt", tmp_path / "error.txt"
    listing.write_text("")
    done = _zygote("--combine", str(folder), str(tmp_path), str(listing), str(error))
    assert done.returncode == 1
    lines = error.read_text().splitlines()
    files = [line.strip() for line in lines if line.strip().startswith("File ")]
    assert files == [
        'File "task.py", line 5, in combine',
        'File "lib/helper.py", line 2, in parse',
        'File "task.py", line 7, in combine',
    ]
    assert "The above exception was the direct cause of the following exception:" in lines
    assert lines[-1] == "RuntimeError: cannot combine"


def test_a_task_that_does_not_import_shows_where_it_failed(tmp_path: Path) -> None:
    folder = make_task(tmp_path / "t", "import json\n\nSETTINGS = json.loads('{')\n")
    done = _zygote("--once", str(folder))
    assert done.returncode == 1
    files = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith("File ")]
    assert files[0] == 'File "task.py", line 3, in <module>'  # no importlib, no zygote
    assert all("zygote" not in f and "<frozen" not in f for f in files)
    assert done.stderr.splitlines()[-1].startswith("json.decoder.JSONDecodeError: Expecting")


def test_store_files_have_the_users_file_mode(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    source = tmp_path / "part.csv"
    source.write_text("a\n")
    source.chmod(0o600)
    store.put("runs/r/combined/a.csv", b"a\n")
    store.put_file("runs/r/combined/b.csv", source)
    assert store.create("runs/r/c.json", b"{}")
    want = 0o666 & ~_umask()
    for key in ("runs/r/combined/a.csv", "runs/r/combined/b.csv", "runs/r/c.json"):
        path = store.local_path(key)
        assert path is not None
        assert stat.S_IMODE(path.stat().st_mode) == want, key
