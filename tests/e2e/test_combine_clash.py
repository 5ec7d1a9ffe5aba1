"""Outputs combine cannot lay out, refused in one line, and ``--inputs`` lists a Windows editor
wrote: a name that is a file in some shards and a folder in others never ends in a traceback nor
touches the shards' outputs; a list that starts with a byte-order mark works."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_inputs, make_task

pytestmark = pytest.mark.e2e

CLASH = """
from pathlib import Path

def run(shard):
    out = Path(shard.output_dir)
    (out / "rows.csv").write_text(f"{shard.index}\\n")
    if shard.index == 0:
        (out / "report.txt").write_text("file\\n")
    else:
        (out / "report.txt").mkdir()
        (out / "report.txt" / "part.txt").write_text("nested\\n")
"""
JOINED = """
def combine(paths, out):
    Path(out, "all.txt").write_text("".join(sorted(Path(p).read_text() for p in paths)))
"""


def _outputs(cli: Cli, run_id: str) -> dict[str, bytes]:
    """Every file under the run's shards (their committed outputs among them), by path."""
    shards = cli.store / "runs" / run_id / "shards"
    return {str(p.relative_to(shards)): p.read_bytes() for p in shards.rglob("*") if p.is_file()}


def test_a_name_that_is_a_file_and_a_folder_is_refused_in_one_line(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(tmp_path / "t", CLASH)
    r = cli("submit", str(task), "--shards", "2", "--workers", "2")
    run = r.run_id
    refusal = (
        "report.txt is a file in shard 00000 but a folder in shard 00001 (report.txt/part.txt),"
        " and combined/report.txt cannot be both: have the task write one or the other under"
        " that name in every shard, or combine these outputs with a combine(paths, out) in"
        f" task.py (`runner combine {run} --task DIR`)"
    )
    assert r.code == 1, r.stderr
    assert "Traceback" not in r.stderr and "2/2 shards succeeded" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: combining run {run} failed: {refusal}; the shards' outputs are kept, fix it and"
        f" run `runner combine {run}`"
    )
    kept = _outputs(cli, run)
    assert kept["00000/attempts/1/out/report.txt"] == b"file\n"
    assert kept["00001/attempts/1/out/report.txt/part.txt"] == b"nested\n"
    out = tmp_path / "result"
    again = cli("combine", run, "--out", str(out))
    assert again.code == 2  # as combine's other refusals
    assert again.stderr.strip().splitlines() == [f"error: {refusal}"]
    assert again.stdout == "" and not out.exists()
    assert not (cli.store / "runs" / run / "combined").exists()  # nothing was half written
    assert _outputs(cli, run) == kept
    # What the line suggests: a combine() of the task's own is given the paths, both shapes.
    make_task(tmp_path / "fixed", CLASH + JOINED)
    fixed = cli("combine", run, "--task", str(tmp_path / "fixed"), "--out", str(out))
    assert fixed.code == 0, fixed.stderr
    assert (out / "all.txt").read_text() == "0\n1\nfile\nnested\n"
    assert _outputs(cli, run) == kept


def test_a_name_kept_per_shard_and_a_folder_of_the_same_name_is_refused(
    cli: Cli, tmp_path: Path
) -> None:
    # emb.npy kept per shard is the folder combined/emb.npy/ holding shard 00000's 00000.npy,
    # where shard 00004's emb.npy/00000.npy would go: its folder took the place of the copy,
    # which emb.npy/manifest.json went on listing, and the combine said nothing.
    task = make_task(
        tmp_path / "t",
        """
        from pathlib import Path

        def run(shard):
            out = Path(shard.output_dir)
            if shard.index < 4:
                (out / "emb.npy").write_bytes(bytes([shard.index]))
            else:
                (out / "emb.npy").mkdir()
                (out / "emb.npy" / "00000.npy").write_bytes(b"inner")
        """,
    )
    r = cli("submit", str(task), "--shards", "5", "--workers", "2")
    assert r.code == 1, r.stderr
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: combining run {r.run_id} failed: emb.npy is a file in shards 00000, 00001,"
        " 00002 and 1 more but a folder in shard 00004 (emb.npy/00000.npy), and combined/emb.npy"
        " cannot be both:"
    )


def test_an_inputs_list_that_starts_with_a_byte_order_mark_works(cli: Cli, tmp_path: Path) -> None:
    data = make_inputs(tmp_path / "data", ["a.csv", "b.csv"])
    task = make_task(tmp_path / "t", "def run(shard):\n    pass\n")
    (tmp_path / "list.txt").write_bytes(b"\xef\xbb\xbfdata/a.csv\r\ndata/b.csv\r\n")
    r = cli("submit", str(task), "--inputs", "@list.txt", "--dry-run")
    assert r.code == 0, r.stderr
    assert [line.split("\t")[1] for line in r.stdout.splitlines()] == [
        str(data / "a.csv"),
        str(data / "b.csv"),
    ]
    piped = subprocess.run(
        cli.argv("submit", str(task), "--inputs", "-", "--dry-run"),
        input=b"\xef\xbb\xbfdata/b.csv\r\n",
        cwd=cli.workdir,
        env=cli.env,
        capture_output=True,
        timeout=60,
    )
    assert piped.returncode == 0, piped.stderr
    assert [line.split(b"\t")[1] for line in piped.stdout.splitlines()] == [
        str(data / "b.csv").encode()
    ]
