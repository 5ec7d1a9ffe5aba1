from __future__ import annotations

from pathlib import Path

import pytest

from runner.engine.shards import from_count, from_glob, from_params
from worker.errors import InputError


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


def test_count() -> None:
    assert [s.id for s in from_count(3)] == ["00000", "00001", "00002"]
    with pytest.raises(InputError):
        list(from_count(0))
