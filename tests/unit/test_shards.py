from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.engine import runs
from runner.engine.runs import iter_shards
from runner.engine.shards import from_count, from_glob, from_params
from worker.backends.local.store import LocalStore
from worker.errors import InputError, NotFound
from worker.protocol import Layout, Shard


def test_glob_gives_sorted_stable_shards(tmp_path: Path) -> None:
    for name in ["b.csv", "a.csv", "sub/c.csv"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    shards = list(from_glob(str(tmp_path / "**" / "*.csv")))
    assert [Path(s.input or "").name for s in shards] == ["a.csv", "b.csv", "c.csv"]
    assert [s.index for s in shards] == [0, 1, 2]
    with pytest.raises(InputError, match="matches no files"):
        list(from_glob(str(tmp_path / "*.parquet")))
    with pytest.raises(InputError, match="needs the Google Cloud backend"):
        list(from_glob("gs://bucket/x/*.csv"))


def test_params_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(InputError, match="line 3 must be a JSON object"):
        list(from_params(path))
    path.write_text('{"a": 1}\n{"a":\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        list(from_params(path))
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert [s.params for s in from_params(path)] == [{"a": 1}, {"a": 2}]


def test_a_params_file_that_cannot_be_read_is_refused_naming_its_line(tmp_path: Path) -> None:
    """Not UTF-8 ended in a UnicodeDecodeError traceback, nesting past Python's JSON reader in a
    RecursionError one, and a folder was said not to exist; a BOM a Windows editor starts the
    file with was refused, while ``--inputs @FILE`` drops it."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(InputError) as caught:
        list(from_params(path))
    assert str(caught.value) == (
        f"{path} line 1 is not UTF-8 text (byte 0xff at column 1); save the file as UTF-8"
    )
    path.write_bytes(b'{"a": 1}\n{"b": "caf\xe9"}\n')
    with pytest.raises(InputError, match=r"line 2 is not UTF-8 text \(byte 0xe9 at column 11\)"):
        list(from_params(path))
    path.write_text('{"a": 1}\n{"a":' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(InputError, match="line 2 nests arrays or objects too deeply to read"):
        list(from_params(path))
    with pytest.raises(InputError) as caught:
        list(from_params(tmp_path))
    assert str(caught.value) == (
        f"--params {tmp_path} is a folder; give a JSON-lines file, one object a line"
    )
    with pytest.raises(InputError, match="does not exist"):
        list(from_params(tmp_path / "nope.jsonl"))
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n{"a": 2}\r\n')
    assert [s.params for s in from_params(path)] == [{"a": 1}, {"a": 2}]


def test_count() -> None:
    assert [s.id for s in from_count(3)] == ["00000", "00001", "00002"]
    with pytest.raises(InputError):
        list(from_count(0))


def _listing(shards: list[Shard]) -> bytes:
    return "".join(json.dumps(s.to_dict()) + "\n" for s in shards).encode()


def test_a_local_shard_list_is_read_where_it_lies_and_a_replaced_one_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_copy(*args: object, **kwargs: object) -> None:
        raise AssertionError("a local shard list was copied to be read")

    monkeypatch.setattr(runs, "temp_folder", no_copy)
    store = LocalStore(tmp_path / "store")
    run_id = "r20261204-000000-abcdef"
    with pytest.raises(NotFound, match=r"shards\.jsonl"):
        list(iter_shards(store, run_id))
    old = [Shard(id=f"{i:05d}", index=i) for i in range(3)]
    store.put(Layout.shard_list(run_id), _listing(old))
    reading = iter_shards(store, run_id)
    first = next(reading)
    store.put(Layout.shard_list(run_id), _listing([Shard(id="new", index=0)]))  # replaced
    assert [first, *reading] == old  # the list as it was when the reading began
    assert [s.id for s in iter_shards(store, run_id)] == ["new"]
