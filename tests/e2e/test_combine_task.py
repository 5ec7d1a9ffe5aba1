"""Combining through the CLI: a task's own combine() (its traceback when it fails, ``runner
combine RUN --task DIR`` with a fixed one), the combined files' modes, and ``--out`` that cannot
be written or holds another run's result."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task

pytestmark = pytest.mark.e2e

TASK = """
from pathlib import Path

from helper import total


def run(shard):
    (Path(shard.output_dir) / "n.txt").write_text(f"{shard.index + 1}\\n")


def combine(paths, out):
    print("combining", len(paths), "parts")
    Path(out, "sum.txt").write_text(f"{total(paths)}\\n")
"""
BROKEN = """
def total(paths):
    values = [int(open(p).read()) for p in paths]
    return sum(values) // 0
"""
FIXED = BROKEN.replace("// 0", "// 1")


def _task(folder: Path, helper: str) -> Path:
    make_task(folder, TASK)
    (folder / "helper.py").write_text(helper.lstrip())
    return folder


def test_a_failing_combine_shows_its_traceback_and_a_fixed_task_combines_the_run(
    cli: Cli, tmp_path: Path
) -> None:
    task = _task(tmp_path / "sums", BROKEN)
    r = cli("submit", str(task), "--shards", "3", "--workers", "2")
    assert r.code == 1, r.stderr
    assert "3/3 shards succeeded" in r.stderr
    # The task's own frames, named as the user knows the files; none of the runner's.
    tail = r.stderr[r.stderr.index("Traceback (most recent call last):") :].splitlines()
    assert tail[1] == '  File "sums/task.py", line 12, in combine'
    assert '  File "sums/helper.py", line 3, in total' in tail
    assert "ZeroDivisionError: integer division or modulo by zero" in tail
    assert "zygote" not in r.stderr and "/bundle" not in r.stderr
    assert tail[-1] == (
        f"error: combining run {r.run_id} failed: the task's combine(paths, out) failed:"
        " ZeroDivisionError: integer division or modulo by zero; the shards' outputs are kept;"
        f" fix combine() in sums/, then `runner combine {r.run_id} --task sums/` combines them"
        " with the fixed one"
    )
    assert cli.status(r.run_id)["state"] == "finished"
    log = cli.store / "runs" / r.run_id / "combine.log"
    assert log.read_text().startswith("combining 3 parts\n")  # what it printed is kept

    again = cli("combine", r.run_id)  # the run's own combine() is still the broken one
    assert again.code == 1 and "ZeroDivisionError" in again.stderr

    fixed = tmp_path / "fixed"
    shutil.copytree(task, fixed)
    (fixed / "helper.py").write_text(FIXED.lstrip())
    out = tmp_path / "result"
    done = cli("combine", r.run_id, "--task", str(fixed), "--out", str(out))
    assert done.code == 0, done.stderr
    assert done.stdout.splitlines() == [str(out / "sum.txt")]
    assert (out / "sum.txt").read_text() == "6\n"  # 1 + 2 + 3: every shard's output, once
    combined = cli.store / "runs" / r.run_id / "combined" / "sum.txt"
    assert combined.read_text() == "6\n"
    attempts = [len(s["attempts"]) for s in cli.status(r.run_id)["shards"]]
    assert attempts == [1, 1, 1]  # no shard ran again


def test_a_fixed_task_without_combine_concatenates_as_its_settings_say(
    cli: Cli, tmp_path: Path
) -> None:
    task = _task(tmp_path / "sums", BROKEN)
    r = cli("submit", str(task), "--shards", "2")
    assert r.code == 1
    plain = make_task(tmp_path / "plain", "def run(shard):\n    pass\n")
    done = cli("combine", r.run_id, "--task", str(plain))
    assert done.code == 0, done.stderr
    assert Path(done.stdout.strip()).read_text() == "1\n2\n"  # n.txt, line format
    missing = cli("combine", r.run_id, "--task", str(tmp_path / "nowhere"))
    assert missing.code == 2
    assert missing.stderr.splitlines() == [f"error: --task {tmp_path / 'nowhere'} is not a folder"]


def test_combine_refuses_an_out_it_cannot_write_in_one_line(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        "from pathlib import Path\n\ndef run(shard):\n"
        "    (Path(shard.output_dir) / 'a.txt').write_text('x\\n')\n",
    )
    r = cli("submit", str(task), "--shards", "1")
    assert r.code == 0, r.stderr
    for where, parent in (("/proc/cflow-out", "/proc"), ("/proc/1/x/y", "/proc/1")):
        bad = cli("combine", r.run_id, "--out", where)
        assert bad.code == 2
        lines = bad.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            f"error: --out {where}: {parent} is not writable ("
        ), bad.stderr


def test_combined_files_and_out_copies_have_the_users_file_mode(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        from pathlib import Path

        def run(shard):
            (Path(shard.output_dir) / "p.csv").write_text(f"{shard.index}\\n")
            (Path(shard.output_dir) / "emb.bin").write_bytes(bytes([shard.index]))
        """,
    )
    out = tmp_path / "out"
    r = cli("submit", str(task), "--shards", "2", "--out", str(out))
    assert r.code == 0, r.stderr
    combined = cli.store / "runs" / r.run_id / "combined"
    made = [p for p in combined.rglob("*") if p.is_file()] + [
        p for p in out.rglob("*") if p.is_file()
    ]
    assert len(made) == 2 * 4 + 1  # p.csv, emb.bin/{2 parts, manifest.json}, the --out mark
    # The CLI runs with this process's umask: any file the user makes gets 0666 less it.
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in made}
    assert modes == dict.fromkeys(modes, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_out_folder_holds_one_runs_result(cli: Cli, tmp_path: Path) -> None:
    writes_ab = make_task(
        tmp_path / "ab",
        "from pathlib import Path\n\ndef run(shard):\n"
        "    (Path(shard.output_dir) / 'a.txt').write_text('A\\n')\n"
        "    (Path(shard.output_dir) / 'b.txt').write_text('A\\n')\n",
    )
    writes_a = make_task(
        tmp_path / "a",
        "from pathlib import Path\n\ndef run(shard):\n"
        "    (Path(shard.output_dir) / 'a.txt').write_text('B\\n')\n",
    )
    res = tmp_path / "res"
    first = cli("submit", str(writes_ab), "--shards", "1", "--out", str(res))
    assert first.code == 0, first.stderr
    assert json.loads((res / ".cflow-result.json").read_text())["run_id"] == first.run_id

    # A new run into it is refused before anything starts: nothing mixes.
    refused = cli("submit", str(writes_a), "--shards", "1", "--out", str(res))
    assert refused.code == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"error: --out {res} holds the result of run {first.run_id} (.cflow-result.json);"
        " give another folder or remove that one"
    ]
    second = cli("submit", str(writes_a), "--shards", "1")
    assert second.code == 0, second.stderr
    again = cli("combine", second.run_id, "--out", str(res))
    assert again.code == 2 and "or --force to replace it" in again.stderr
    assert (res / "b.txt").read_text() == "A\n"  # untouched

    (res / "notes.md").write_text("mine\n")  # not the result's: kept whatever happens
    forced = cli("combine", second.run_id, "--out", str(res), "--force")
    assert forced.code == 0, forced.stderr
    assert sorted(p.name for p in res.iterdir()) == [".cflow-result.json", "a.txt", "notes.md"]
    assert (res / "a.txt").read_text() == "B\n"
    mine = cli("combine", second.run_id, "--out", str(res))  # its own result: replaced freely
    assert mine.code == 0, mine.stderr
