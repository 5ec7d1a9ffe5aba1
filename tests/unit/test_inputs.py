"""``--inputs`` taken as given: globs add up, lists of paths, links under their own names, a file
reached twice is one shard, and what is not a file is refused by name (real files, links, fifos,
sockets and folders in a temporary folder)."""

from __future__ import annotations

import io
import os
import socket
import unicodedata
from pathlib import Path

import pytest

from runner.engine.shards import Inputs, input_shard_id
from runner.submit import SubmitRequest
from worker.errors import InputError
from worker.protocol import Shard


def _files(folder: Path, *names: str) -> Path:
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name}\n")
    return folder


def _shards(
    specs: list[str], said: list[str] | None = None, stdin: str | None = None
) -> list[Shard]:
    stream = io.StringIO(stdin) if stdin is not None else None
    gathered = Inputs.gather(specs, stdin=stream)
    return list(gathered.shards(say=None if said is None else said.append))


def _names(shards: list[Shard]) -> list[str]:
    return [Path(s.input or "").name for s in shards]


def test_repeated_globs_add_up_in_the_order_given(tmp_path: Path) -> None:
    _files(tmp_path, "b-1.csv", "b-0.csv", "a-1.csv", "a-0.csv")
    shards = _shards([str(tmp_path / "b-*.csv"), str(tmp_path / "a-*.csv")])
    assert _names(shards) == ["b-0.csv", "b-1.csv", "a-0.csv", "a-1.csv"]
    assert [s.index for s in shards] == [0, 1, 2, 3]
    assert len({s.id for s in shards}) == 4


def test_every_glob_must_match_even_when_another_does(tmp_path: Path) -> None:
    _files(tmp_path, "a.csv")
    with pytest.raises(InputError, match=r"'.*\.parquet' matches no files"):
        _shards([str(tmp_path / "*.csv"), str(tmp_path / "*.parquet")])


def test_the_request_keeps_every_inputs_option(tmp_path: Path) -> None:
    _files(tmp_path, "x/1.csv", "y/2.csv")
    request = SubmitRequest(tmp_path, inputs=[str(tmp_path / "x/*"), str(tmp_path / "y/*")])
    assert _names(list(request.shard_source())) == ["1.csv", "2.csv"]
    one = SubmitRequest(tmp_path, inputs=str(tmp_path / "x/*"))  # type: ignore[arg-type]
    assert one.inputs == [str(tmp_path / "x/*")]


def test_a_list_file_is_read_relative_to_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _files(tmp_path / "data", "one.csv", "two [1].csv", "sub/three.csv")
    (data / "list.txt").write_text(
        "# the inputs of this run\n\ntwo [1].csv\r\n  sub/three.csv  \n"
        f"{data / 'one.csv'}\n   # indented comment\n"
    )
    monkeypatch.chdir(tmp_path / "data" / "sub")  # elsewhere: the list's folder counts
    shards = _shards([f"@{data / 'list.txt'}"])
    assert [s.input for s in shards] == [
        str(data / "two [1].csv"),  # a path, never a glob
        str(data / "sub" / "three.csv"),
        str(data / "one.csv"),
    ]


def test_a_listed_name_with_spaces_at_its_ends_is_its_own_where_only_it_is_there(
    tmp_path: Path,
) -> None:
    """Every line was stripped: ``trail.csv `` could not be listed, and the error named
    another file (``trail.csv: no such file``)."""
    data = _files(tmp_path / "data", "trail.csv ", "both.csv", "both.csv ")
    (data / "list.txt").write_text("trail.csv \r\n  both.csv \n")
    shards = _shards([f"@{data / 'list.txt'}"])
    assert [s.input for s in shards] == [str(data / "trail.csv "), str(data / "both.csv")]


def test_a_list_on_stdin_is_read_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _files(tmp_path, "in/a.csv", "in/b.csv")
    monkeypatch.chdir(tmp_path)
    shards = _shards(["-"], stdin="in/b.csv\nin/a.csv\n")
    assert [s.input for s in shards] == [str(tmp_path / "in/b.csv"), str(tmp_path / "in/a.csv")]


def test_lists_that_cannot_be_used_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    with pytest.raises(InputError, match="lists no paths"):
        _shards([f"@{tmp_path / 'empty.txt'}"])
    with pytest.raises(InputError, match="cannot read the list"):
        _shards([f"@{tmp_path / 'missing.txt'}"])
    with pytest.raises(InputError, match="given twice"):
        _shards(["-", "-"], stdin="a\n")
    with pytest.raises(InputError, match="no such file"):
        _shards(["-"], stdin=f"{tmp_path / 'gone.csv'}\n")


def test_a_link_keeps_its_own_name_and_path(tmp_path: Path) -> None:
    """A git-annex or DVC layout: the shard is the link, the worker reads through it."""
    objects = _files(tmp_path / ".objects", "SHA256E-s6--deadbeef0.csv", "SHA256E-s6--beef1.csv")
    data = tmp_path / "data"
    data.mkdir()
    (data / "region-0.csv").symlink_to(objects / "SHA256E-s6--deadbeef0.csv")
    (data / "region-1.csv").symlink_to(Path("..") / ".objects" / "SHA256E-s6--beef1.csv")
    shards = _shards([str(data / "*.csv")])
    assert [s.input for s in shards] == [str(data / "region-0.csv"), str(data / "region-1.csv")]
    assert [s.id.rsplit("-", 1)[0] for s in shards] == ["region-0.csv", "region-1.csv"]
    assert Path(shards[1].input or "").read_text() == "SHA256E-s6--beef1.csv\n"


def test_the_same_file_reached_twice_is_one_shard_and_said_once(tmp_path: Path) -> None:
    _files(tmp_path, "mix/a.txt", "mix/b.txt")
    (tmp_path / "mix" / "link.txt").symlink_to("a.txt")
    (tmp_path / "list.txt").write_text("mix/b.txt\nmix/b.txt\n")
    said: list[str] = []
    shards = _shards(
        [str(tmp_path / "mix/*"), str(tmp_path / "mix/a.txt"), f"@{tmp_path / 'list.txt'}"],
        said,
    )
    assert _names(shards) == ["a.txt", "b.txt"]  # the first to reach a file names it
    mix = tmp_path / "mix"
    assert said == [
        "4 inputs reach a file already taken and run once:"
        f" {mix / 'link.txt'} (the same file as {mix / 'a.txt'}), {mix / 'a.txt'} (again),"
        f" {mix / 'b.txt'} (again) and 1 more"
    ]


def test_what_is_not_a_file_is_refused_one_line_each(tmp_path: Path) -> None:
    mix = _files(tmp_path / "mix", "a.txt")
    (mix / "broken.txt").symlink_to("/nonexistent/target")
    os.mkfifo(mix / "fifo")
    (mix / "folder").mkdir()
    (mix / "to-folder").symlink_to("folder")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(mix / "sock"))
        with pytest.raises(InputError) as caught:
            _shards([str(mix / "*")])
    finally:
        sock.close()
    lines = str(caught.value).splitlines()
    assert lines[0] == "5 inputs are not readable files; name files only (nothing was started):"
    assert sorted(line.strip() for line in lines[1:]) == [
        f"{mix / 'broken.txt'}: a broken link (to /nonexistent/target)",
        f"{mix / 'fifo'}: a fifo",
        f"{mix / 'folder'}: a folder",
        f"{mix / 'sock'}: a socket",
        f"{mix / 'to-folder'}: a link to a folder",
    ]


def test_paths_are_named_relative_to_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "gone.csv").symlink_to("nowhere.csv")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^1 input is not a readable file") as caught:
        _shards(["in/*.csv"])
    assert str(caught.value).splitlines()[1] == "  in/gone.csv: a broken link (to nowhere.csv)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    locked = _files(tmp_path, "locked.csv") / "locked.csv"
    locked.chmod(0)
    with pytest.raises(InputError, match=r"locked\.csv: not readable"):
        _shards([str(locked)])


def test_cloud_storage_inputs_need_the_google_cloud_backend(tmp_path: Path) -> None:
    _files(tmp_path, "a.csv")
    with pytest.raises(InputError, match="needs the Google Cloud backend"):
        _shards([str(tmp_path / "*.csv"), "gs://bucket/x/*.csv"])
    (tmp_path / "list.txt").write_text("a.csv\ngs://bucket/x/b.csv\n")
    gathered = Inputs.gather([f"@{tmp_path / 'list.txt'}"])
    assert gathered.remote == [f"@{tmp_path / 'list.txt'}"]


def test_non_ascii_names_give_readable_ids() -> None:
    assert input_shard_id("/uni/日本.txt").startswith("日本.txt-")
    assert input_shard_id("/uni/東京.txt").startswith("東京.txt-")
    assert input_shard_id("/d/Zürich données.csv").startswith("Zürich-données.csv-")
    assert input_shard_id("/d/हिन्दी.txt").startswith("हिन्दी.txt-")  # combining marks kept
    full_width = "\uff21\uff22\uff23\uff11.csv"  # full-width ABC1.csv
    assert input_shard_id(f"/d/{full_width}").startswith("ABC1.csv-")  # folded to ASCII
    # The same name, composed or decomposed (macOS), is the same readable stem.
    decomposed = unicodedata.normalize("NFD", "/d/café.csv")
    assert input_shard_id(decomposed).split("-")[0] == input_shard_id("/d/café.csv").split("-")[0]


@pytest.mark.parametrize(
    "name",
    [
        "a b.csv",
        "x;$(rm -rf ~)|&.csv",
        "\u202etxt.exe",  # a right-to-left override
        "new\nline\t.csv",
        "#[*?].csv",
        ".hidden",
        "日本" * 60 + ".csv",
        "\u3000\u3000",  # only ideographic spaces
    ],
)
def test_ids_stay_safe_object_names(name: str) -> None:
    shard_id = input_shard_id(f"/d/{name}")
    assert shard_id == input_shard_id(f"/d/{name}")  # stable
    assert shard_id != input_shard_id(f"/e/{name}")
    assert all(
        c in "._-" or (c.isascii() and c.isalnum()) or unicodedata.category(c)[0] in "LNM"
        for c in shard_id
    ), shard_id
    assert not shard_id.startswith((".", "-")) and len(shard_id) <= 49
    assert len(shard_id.encode()) <= 4 * 40 + 9  # far below an object name's 1,024 bytes
