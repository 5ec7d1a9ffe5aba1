"""Combine through the CLI: every data row kept, folders kept, ``--out`` checked first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task, wait_for

pytestmark = pytest.mark.e2e

HEADERLESS = """
from pathlib import Path

def run(shard):
    out = Path(shard.output_dir)
    # Header-less rows, and every part's first row is the same data row.
    (out / "a.csv").write_text(f"0,0\\n{shard.index},x\\n")
    (out / "sub").mkdir()
    (out / "sub" / "a.csv").write_text(f"sub,{shard.index}")  # no final newline
"""


def test_headerless_rows_are_never_dropped_and_folders_are_kept(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", HEADERLESS)
    out = tmp_path / "result"
    r = cli("submit", str(task), "--shards", "4", "--workers", "2", "--out", str(out))
    assert r.code == 0, r.stderr
    assert (out / "a.csv").read_text() == "".join(f"0,0\n{i},x\n" for i in range(4))
    assert (out / "sub" / "a.csv").read_text() == "".join(f"sub,{i}\n" for i in range(4))
    assert "every part of a.csv starts with '0,0'" in r.stderr  # a hint, and nothing dropped
    assert (
        f"written: {out / 'a.csv'}" in r.stderr and f"written: {out / 'sub' / 'a.csv'}" in r.stderr
    )


def test_declared_headers_are_kept_once_and_combine_prints_where_it_wrote(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(
        tmp_path / "t",
        """
        from pathlib import Path

        def run(shard):
            (Path(shard.output_dir) / "p.csv").write_text(f"id,v\\n{shard.index},1\\n")
        """,
    )
    (task / "cflow.toml").write_text("[combine]\nheaders = true\n")
    r = cli("submit", str(task), "--shards", "3", "--workers", "2")
    assert r.code == 0, r.stderr
    out = tmp_path / "again"
    again = cli("combine", r.run_id, "--out", str(out))
    assert again.code == 0, again.stderr
    assert again.stdout.splitlines() == [str(out / "p.csv")]
    assert (out / "p.csv").read_text() == "id,v\n0,1\n1,1\n2,1\n"
    raw = cli("combine", r.run_id, "--no-headers")
    assert raw.code == 0 and raw.stdout.strip().endswith("combined/p.csv")
    combined = Path(raw.stdout.strip()).read_text()
    assert combined == "id,v\n0,1\nid,v\n1,1\nid,v\n2,1\n"


def test_out_is_checked_before_the_run_starts(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", HEADERLESS)
    taken = tmp_path / "taken.csv"
    taken.write_text("mine\n")
    r = cli("submit", str(task), "--shards", "2", "--out", str(taken))
    assert r.code == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --out {taken} exists and is not a folder; give a folder to write into"
    ]
    assert r.stdout == "" and not cli.store.exists()  # nothing was created, nothing ran
    assert taken.read_text() == "mine\n"


def test_out_never_writes_over_a_file_of_the_users(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        from pathlib import Path

        def run(shard):
            (Path(shard.output_dir) / "o.txt").write_text(f"{shard.index}\\n")
        """,
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "o.txt").write_text("my own notes\n")
    r = cli("submit", str(task), "--shards", "2", "--out", str(mine))
    refusal = (
        f"--out {mine}: {mine / 'o.txt'} is in the way of the combined result and no combine of"
        f" run {r.run_id} wrote it; it is left as it is: give another folder (`runner combine"
        f" {r.run_id} --out DIR`), or move it away and combine again"
    )
    assert r.code == 1 and "2/2 shards succeeded" in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: combining run {r.run_id} failed: {refusal};")
    )
    assert sorted(p.name for p in mine.iterdir()) == ["o.txt"]
    assert (mine / "o.txt").read_text() == "my own notes\n"
    again = cli("combine", r.run_id, "--out", str(mine), "--force")
    assert again.code == 2 and again.stdout == ""
    assert again.stderr.strip().splitlines() == [  # combined in the store, not copied out
        "cflow: o.txt: lines of 2 parts concatenated",
        f"error: {refusal}",
    ]
    assert (mine / "o.txt").read_text() == "my own notes\n"
    (mine / "o.txt").unlink()  # what the line says to do
    done = cli("combine", r.run_id, "--out", str(mine))
    assert done.code == 0, done.stderr
    assert (mine / "o.txt").read_text() == "0\n1\n"
    assert cli("combine", r.run_id, "--out", str(mine)).code == 0  # its own: replaced freely


def test_out_in_the_store_is_the_runs_own_result_or_refused(cli: Cli, tmp_path: Path) -> None:
    """``--out`` naming the run's own combined folder ended in shutil.SameFileError: it is the
    place the result goes anyway. Elsewhere in the store the copy would land among the store's
    own files (another run's result): refused in one line."""
    task = make_task(tmp_path / "t", HEADERLESS)
    run_id = cli("submit", str(task), "--shards", "2").run_id
    own = cli.store / "runs" / run_id / "combined"
    for out in (str(own), f"{own}/", str(own.relative_to(tmp_path))):
        again = cli("combine", run_id, "--out", out)
        assert again.code == 0, again.stderr
        assert again.stdout.splitlines() == [str(own / "a.csv"), str(own / "sub" / "a.csv")]
    assert (own / "a.csv").read_text() == "".join(f"0,0\n{i},x\n" for i in range(2))
    assert sorted(p.name for p in own.iterdir()) == ["a.csv", "sub"]  # no result mark
    other = cli("submit", str(task), "--shards", "1").run_id
    theirs = cli.store / "runs" / other / "combined"
    before = (theirs / "a.csv").read_text()
    for out, where in ((theirs, f"inside the store {cli.store}"), (cli.store, "the store")):
        refused = cli("combine", run_id, "--out", str(out))
        assert refused.code == 2 and refused.stdout == ""
        assert refused.stderr.splitlines() == [
            f"error: --out {out} is {where}; give a folder outside it (the result is in {own}"
            " anyway)"
        ]
    assert (theirs / "a.csv").read_text() == before and not (cli.store / "a.csv").exists()
    # A submit's --out inside the store wrote among its files too (its queue, a run's result).
    refused = cli("submit", str(task), "--shards", "1", "--out", str(cli.store / "mine"))
    assert refused.code == 2 and refused.stderr.splitlines()[-1] == (
        f"error: --out {cli.store / 'mine'} is inside the store {cli.store}; give a folder"
        " outside it"
    )
    assert not (cli.store / "mine").exists()


def test_a_run_without_outputs_says_so(cli: Cli, tmp_path: Path) -> None:
    task = make_task(tmp_path / "t", "def run(shard):\n    pass\n")
    out = tmp_path / "nothing"
    r = cli("submit", str(task), "--shards", "2", "--out", str(out))
    assert r.code == 0, r.stderr
    assert "no outputs" in r.stderr and "written" not in r.stderr and not out.exists()
    again = cli("combine", r.run_id, "--out", str(out))
    assert again.code == 0 and again.stdout == ""
    assert f"run {r.run_id} has no outputs to combine" in again.stderr


def test_combine_of_an_unfinished_run_is_not_0(cli: Cli, tmp_path: Path) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import time
        from pathlib import Path

        def run(shard):
            while shard.index:  # shard 0 commits; the others run until cancelled
                time.sleep(0.05)
            (Path(shard.output_dir) / "x.txt").write_text(f"{shard.index}\\n")
        """,
    )
    r = cli("submit", str(task), "--shards", "3", "--workers", "1", "--detach")
    assert r.code == 0, r.stderr
    first = f"runs/{r.run_id}/shards/00000/result.json"
    wait_for(lambda: cli.records(first), 60, "the first shard to commit")
    early = cli("combine", r.run_id)
    assert early.code == 1
    assert "have no committed output" in early.stderr and "partial" in early.stderr
    cli("cancel", r.run_id)
    status = cli.status(r.run_id)
    assert status["counts"]["succeeded"] + status["counts"]["cancelled"] == 3
    assert json.loads(cli("runs", "--json").stdout)[0]["state"] == "cancelled"


def test_a_failing_combine_leaves_the_run_finished_and_says_how_to_redo_it(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(
        tmp_path / "t",
        """
        from pathlib import Path

        def run(shard):
            (Path(shard.output_dir) / "n.txt").write_text("1\\n")

        def combine(paths, out):
            raise RuntimeError("combine is broken")
        """,
    )
    r = cli("submit", str(task), "--shards", "2")
    assert r.code == 1
    assert "2/2 shards succeeded" in r.stderr
    assert "combining run" in r.stderr and "RuntimeError: combine is broken" in r.stderr
    assert f"`runner combine {r.run_id} --task t/`" in r.stderr
    assert cli.status(r.run_id)["state"] == "finished"
