"""Sealed outputs are files of their own, named in UTF-8, through the real CLI.

A task cannot change its outputs once committed: a symbolic link it leaves in its output folder
is committed as a copy of the file it leads to, as the attempt left it, so neither a later
change to that file nor its removal (its working folder goes with the attempt) reaches the
run's result. A link that leads to no regular file, and a name that is not UTF-8 (which the
store and ``runner combine`` cannot hold), fail the attempt at its seal with one line that
names the output; nothing of it is committed, and the shard is retried or failed as usual.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.e2e.conftest import Cli, make_task

pytestmark = pytest.mark.e2e

FIX = "write the file itself into the output folder, not a link to it"


def _committed(cli: Cli, run_id: str) -> dict[str, str | bytes]:
    """Everything under the run's sealed output folders: a file's bytes, else what it is."""
    found: dict[str, str | bytes] = {}
    shards = cli.store / "runs" / run_id / "shards"
    for out in shards.glob("*/attempts/*/out"):
        for path in sorted(out.rglob("*")):
            key = str(path.relative_to(shards))
            if path.is_symlink():
                found[key] = f"link to {os.readlink(path)}"
            elif path.is_file():
                found[key] = path.read_bytes()
    return found


def _reasons(cli: Cli, run_id: str) -> list[str | None]:
    return [a["reason"] for s in cli.status(run_id)["shards"] for a in s["attempts"]]


PY_LINKS = """
import os
from pathlib import Path

def run(shard):
    out = Path(shard.output_dir)
    Path(OUTSIDE).write_text("original\\n")
    os.symlink(OUTSIDE, out / "res.txt")
    Path("cached.txt").write_text("from the working folder\\n")  # removed with the attempt
    os.symlink(Path("cached.txt").resolve(), out / "cwd.txt")
    (out / "sub").mkdir()
    (out / "sub" / "real.txt").write_text("real\\n")
    os.symlink("real.txt", out / "sub" / "sibling.txt")
"""

SH_LINKS = """
#!/usr/bin/env bash
set -e
echo original > "$OUTSIDE"
ln -s "$OUTSIDE" "$CFLOW_OUTPUT_DIR/res.txt"
echo "from the working folder" > cached.txt
ln -s "$PWD/cached.txt" "$CFLOW_OUTPUT_DIR/cwd.txt"
mkdir "$CFLOW_OUTPUT_DIR/sub"
echo real > "$CFLOW_OUTPUT_DIR/sub/real.txt"
ln -s real.txt "$CFLOW_OUTPUT_DIR/sub/sibling.txt"
"""


@pytest.mark.parametrize(
    ("name", "body"),
    [("task.py", PY_LINKS), ("task.sh", SH_LINKS)],
    ids=["python", "shell"],
)
def test_a_link_to_a_file_is_committed_as_a_copy_of_what_it_led_to(
    cli: Cli, tmp_path: Path, name: str, body: str
) -> None:
    outside = tmp_path / "target.txt"
    if name == "task.py":
        body = f"OUTSIDE = {str(outside)!r}\n" + body
    else:
        body = body.replace('"$OUTSIDE"', f"'{outside}'")
    task = make_task(tmp_path / "t", body, name=name)
    r = cli("submit", str(task), "--shards", "1")
    assert r.code == 0, r.stderr
    committed = _committed(cli, r.run_id)
    assert committed == {
        "00000/attempts/1/out/cwd.txt": b"from the working folder\n",
        "00000/attempts/1/out/res.txt": b"original\n",
        "00000/attempts/1/out/sub/real.txt": b"real\n",
        "00000/attempts/1/out/sub/sibling.txt": b"real\n",
    }
    out = cli.store / "runs" / r.run_id / "shards" / "00000" / "attempts" / "1" / "out"
    for key in committed:  # sealed like any output: read-only files of their own
        mode = (out.parents[3] / key).stat().st_mode
        assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # What the links led to changes, then goes: the committed outputs and the result do not.
    outside.write_text("changed\n")
    combined = cli.store / "runs" / r.run_id / "combined" / "res.txt"
    again = cli("combine", r.run_id)
    assert again.code == 0, again.stderr
    assert combined.read_text() == "original\n"
    outside.unlink()
    again = cli("combine", r.run_id)
    assert again.code == 0, again.stderr
    assert combined.read_text() == "original\n"
    assert (cli.store / "runs" / r.run_id / "combined" / "cwd.txt").read_text() == (
        "from the working folder\n"
    )
    assert _committed(cli, r.run_id) == committed


LINKS_TO = """
import os
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "good.txt").write_text("good\\n")
    os.symlink(TARGET, Path(shard.output_dir) / "res.txt")
"""


@pytest.mark.parametrize("kind", ["missing", "folder", "fifo", "device"])
def test_a_link_to_no_regular_file_fails_the_attempt_naming_it(
    cli: Cli, tmp_path: Path, kind: str
) -> None:
    target = {
        "missing": tmp_path / "gone.txt",
        "folder": tmp_path / "folder",
        "fifo": tmp_path / "fifo",  # never opened: no writer would ever let the worker go on
        "device": Path("/dev/null"),
    }[kind]
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    task = make_task(tmp_path / "t", f"TARGET = {str(target)!r}\n" + LINKS_TO)
    r = cli("submit", str(task), "--shards", "1", "--max-attempts", "2")
    assert r.code == 1, r.stderr
    what = {
        "missing": "which does not exist",
        "folder": "which is a folder, not a regular file",
        "fifo": "which is a fifo, not a regular file",
        "device": "which is a device, not a regular file",
    }[kind]
    reason = f"output 'res.txt' is a link to {str(target)!r}, {what}: {FIX}"
    assert _reasons(cli, r.run_id) == [reason, reason]  # retried as usual, then failed
    assert f"failed 00000: {reason}\n" in r.stderr
    assert "Traceback" not in r.stderr
    assert _committed(cli, r.run_id) == {}  # not even good.txt
    assert cli.records(f"runs/{r.run_id}/shards/*/result.json") == {}
    log = cli("logs", r.run_id, "--shard", "00000")
    assert f"cflow: {reason}" in log.stdout
    again = cli("combine", r.run_id)
    assert again.code == 0, again.stderr
    assert "Traceback" not in again.stderr


NOT_UTF8 = {
    "file": (
        "task.py",
        """
        import os

        def run(shard):
            with open(os.path.join(shard.output_dir, "good.txt"), "w") as fh:
                fh.write("good\\n")
            with open(os.path.join(os.fsencode(shard.output_dir), b"caf\\xe9.txt"), "wb") as fh:
                fh.write(b"x\\n")
        """,
        "b'caf\\xe9.txt'",
    ),
    "folder": (
        "task.py",
        """
        import os

        def run(shard):
            folder = os.path.join(os.fsencode(shard.output_dir), b"d\\xe9j\\xe0")
            os.mkdir(folder)
            with open(os.path.join(folder, b"ok.txt"), "wb") as fh:
                fh.write(b"x\\n")
        """,
        "b'd\\xe9j\\xe0'",
    ),
    "shell": (
        "task.sh",
        """
        #!/usr/bin/env bash
        mkdir "$CFLOW_OUTPUT_DIR/sub"
        echo x > "$CFLOW_OUTPUT_DIR/sub/$(printf 'caf\\351.txt')"
        """,
        "b'sub/caf\\xe9.txt'",
    ),
}


@pytest.mark.parametrize("case", list(NOT_UTF8))
def test_an_output_name_that_is_not_utf8_fails_the_attempt_naming_it(
    cli: Cli, tmp_path: Path, case: str
) -> None:
    name, body, shown = NOT_UTF8[case]
    task = make_task(tmp_path / "t", body, name=name)
    r = cli("submit", str(task), "--shards", "1", "--max-attempts", "2")
    assert r.code == 1, r.stderr
    reason = f"output {shown} has a name that is not UTF-8: output names must be UTF-8"
    assert _reasons(cli, r.run_id) == [reason, reason]
    assert f"failed 00000: {reason}\n" in r.stderr
    assert "Traceback" not in r.stderr
    assert _committed(cli, r.run_id) == {}
    for _ in range(2):  # and every later combine as well
        again = cli("combine", r.run_id)
        assert again.code == 0, again.stderr
        assert "Traceback" not in again.stderr


def test_the_retry_of_an_attempt_whose_outputs_were_refused_starts_empty_and_commits(
    cli: Cli, tmp_path: Path
) -> None:
    task = make_task(
        tmp_path / "t",
        """
        import os
        from pathlib import Path

        def run(shard):
            out = Path(shard.output_dir)
            if shard.attempt == 1:
                (out / "good.txt").write_text("first\\n")
                os.symlink("/nonexistent/cflow-target", out / "res.txt")
                return
            (out / "seen.txt").write_text(repr(sorted(os.listdir(out))) + "\\n")
        """,
    )
    r = cli("submit", str(task), "--shards", "1", "--max-attempts", "2")
    assert r.code == 0, r.stderr
    (first, second) = _reasons(cli, r.run_id)
    assert first == (
        f"output 'res.txt' is a link to '/nonexistent/cflow-target', which does not exist: {FIX}"
    )
    assert second is None
    assert _committed(cli, r.run_id) == {"00000/attempts/2/out/seen.txt": b"[]\n"}


HARD_LINKED = """
import os
from pathlib import Path

def run(shard):
    Path(OUTSIDE).write_text("original\\n")
    os.link(OUTSIDE, Path(shard.output_dir) / "res.txt")
"""


def test_a_file_hard_linked_from_elsewhere_is_committed_as_a_copy(cli: Cli, tmp_path: Path) -> None:
    """Sealing it read-only changed the task's other file too, and that name could still
    rewrite the committed bytes."""
    outside = tmp_path / "outside.txt"
    task = make_task(tmp_path / "t", HARD_LINKED.replace("OUTSIDE", repr(str(outside))))
    r = cli("submit", str(task), "--shards", "1")
    assert r.code == 0, r.stderr
    (sealed,) = (cli.store / "runs" / r.run_id / "shards").glob("*/attempts/*/out/res.txt")
    assert sealed.stat().st_nlink == 1 and sealed.read_text() == "original\n"
    assert stat.S_IMODE(outside.stat().st_mode) & stat.S_IWUSR  # left as the task made it
    outside.write_text("changed\n")
    assert sealed.read_text() == "original\n"


def test_a_fifo_among_the_outputs_fails_the_attempt_naming_it(cli: Cli, tmp_path: Path) -> None:
    body = "import os\n\ndef run(shard):\n    os.mkfifo(os.path.join(shard.output_dir, 'p'))\n"
    r = cli("submit", str(make_task(tmp_path / "t", body)), "--shards", "1", "--max-attempts", "1")
    assert r.code == 1, r.stderr
    assert _reasons(cli, r.run_id) == [
        "output 'p' is a fifo, not a regular file: write a regular file"
    ]
    assert _committed(cli, r.run_id) == {}
