"""Which folders a warm container mounts for a shard (worker.executors.container.warm), without an
engine."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.executors.container.warm import covers, merge, needs
from worker.taskapi import TaskShard


def _shard(out: str, input_path: str | None = None) -> TaskShard:
    return TaskShard("r", "s", 0, 1, input_path, Path(out))


def test_a_shard_needs_its_slot_read_write_and_its_inputs_folder_read_only() -> None:
    shard = _shard("/w/scratch/slot-0/out-3", "/data/in/f1.csv")
    assert needs(shard, Path("/w/scratch/slot-0/log-3.txt")) == [
        (Path("/w/scratch/slot-0"), "rw"),
        (Path("/data/in"), "ro"),
    ]


def test_a_staged_input_in_the_slot_adds_no_mount() -> None:
    shard = _shard("/w/slot-0/out-0", "/w/slot-0/input-0/f.csv")
    assert needs(shard, Path("/w/slot-0/log-0.txt")) == [(Path("/w/slot-0"), "rw")]


def test_a_remote_input_is_not_mounted() -> None:
    shard = _shard("/w/slot-0/out-0", "gs://b/in/f.csv")
    assert needs(shard, Path("/w/slot-0/log-0.txt")) == [(Path("/w/slot-0"), "rw")]


@pytest.mark.parametrize(
    "input_path",
    ["/f.csv", "/tmp/f.csv", "/usr/share/f.csv", "/data/a:b/f.csv", "/data/a,b/f.csv"],
    ids=["root", "tmp", "usr", "colon", "comma"],
)
def test_a_folder_that_cannot_be_mounted_at_its_own_path_needs_its_own_container(
    input_path: str,
) -> None:
    assert needs(_shard("/w/slot-0/out-0", input_path), Path("/w/slot-0/log-0.txt")) is None


def test_read_only_is_not_enough_for_a_folder_written_to() -> None:
    mounts = [(Path("/data"), "ro"), (Path("/w/slot-0"), "rw")]
    assert covers(mounts, [(Path("/data/in"), "ro"), (Path("/w/slot-0/x"), "rw")])
    assert not covers(mounts, [(Path("/data/in"), "rw")])
    assert not covers(mounts, [(Path("/datax"), "ro")])  # a sibling, not a subfolder


def test_merge_keeps_what_is_needed_and_drops_what_is_covered() -> None:
    old = [(Path("/w/slot-0"), "rw"), (Path("/data/a"), "ro")]
    merged = merge(old, [(Path("/data/b"), "ro"), (Path("/data"), "ro"), (Path("/w"), "rw")])
    assert merged == [(Path("/data"), "ro"), (Path("/w"), "rw")]
