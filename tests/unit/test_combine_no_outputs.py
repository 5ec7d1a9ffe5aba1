"""A run whose shards wrote no outputs (a cflow map: the values sit in the commit records) is
combined without unpacking its bundle, unless its task has a combine() of its own to call."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from runner.results import combine as combine_mod
from runner.results.combine import combine_run
from runner.results.parts import OutTarget
from tests.unit.test_combine import _run
from worker.bundle import pack
from worker.protocol import Layout

OWN_COMBINE = """
def run(shard):
    pass

def combine(paths, out):
    (out / "count.txt").write_text(f"{len(paths)}\\n")
"""


@pytest.fixture
def unpacked(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The task folders the combine unpacked (the real unpacking, recorded)."""
    seen: list[Any] = []
    real = combine_mod.open_task

    def recording(*args: Any) -> Any:
        folder = real(*args)
        seen.append(folder)
        return folder

    monkeypatch.setattr(combine_mod, "open_task", recording)
    return seen


def test_no_outputs_and_no_combine_leave_the_bundle_packed(
    tmp_path: Path, unpacked: list[Any]
) -> None:
    b, m = _run(tmp_path, [{}, {}])
    b.store.put(Layout.combined(m.run_id) + "stale.csv", b"from an earlier combine\n")
    combined = combine_run(b.store, m, out=OutTarget(path=tmp_path / "out"))
    assert unpacked == []
    assert combined.files == [] and combined.shards == 2 and combined.missing == 1
    assert list(b.store.list(Layout.combined(m.run_id))) == []  # an earlier result still goes


def test_outputs_are_still_combined_from_the_unpacked_task(
    tmp_path: Path, unpacked: list[Any]
) -> None:
    b, m = _run(tmp_path, [{"a.csv": b"1\n"}, {}])
    combined = combine_run(b.store, m)
    assert len(unpacked) == 1
    assert [b.store.get(f) for f in combined.files] == [b"1\n"]


def test_a_task_combine_runs_even_without_outputs(tmp_path: Path, unpacked: list[Any]) -> None:
    b, m = _run(tmp_path, [{}, {}], task_py=OWN_COMBINE)
    combined = combine_run(b.store, m)
    assert len(unpacked) == 1
    assert [b.store.get(f) for f in combined.files] == [b"0\n"]


def test_a_shell_task_without_outputs_is_not_unpacked(tmp_path: Path, unpacked: list[Any]) -> None:
    b, m = _run(tmp_path, [{}])
    shell = tmp_path / "shell"
    shell.mkdir()
    (shell / "task.sh").write_text("echo hi\n")
    data, sha = pack(shell)
    b.store.put(Layout.bundle(sha), data)
    combined = combine_run(b.store, dataclasses.replace(m, bundle=sha, entry="shell"))
    assert unpacked == [] and combined.files == [] and combined.shards == 1
