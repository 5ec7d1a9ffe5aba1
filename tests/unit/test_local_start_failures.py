"""Local workers that end as they start, one after another, stop the watch with what the last
one said, instead of a run that waits with no worker for ever."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from runner.backends.local.fleet import CRASH_LOOP, LocalFleet, WorkersFailToStart
from tests.e2e.conftest import wait_for


def _gone(fleet: LocalFleet, names: list[str]) -> bool:
    listed = {i.name for i in fleet.instances()}
    return not listed & set(names)


def test_workers_that_end_as_they_start_stop_the_watch_with_their_last_line(
    tmp_path: Path,
) -> None:
    fleet = LocalFleet(tmp_path / "store", run_id="r1", extra_args=["--no-such-option"])
    started: list[str] = []
    with pytest.raises(WorkersFailToStart) as failed:
        for _ in range(CRASH_LOOP + 1):
            names = fleet.grow(1)
            started += names
            wait_for(lambda names=names: _gone(fleet, names), 30, "the worker to end")
    assert len(started) == CRASH_LOOP
    message = str(failed.value)
    assert message.startswith(f"local workers end as they start ({CRASH_LOOP} in a row)")
    assert "unrecognized arguments: --no-such-option" in message, message
    assert message.endswith("the run waits: fix that, then `runner watch r1`"), message


def test_a_worker_that_lived_or_was_told_to_go_is_no_failure(tmp_path: Path) -> None:
    fleet = LocalFleet(tmp_path / "store", run_id="r1", idle_timeout=0.5)
    for _ in range(CRASH_LOOP + 1):  # each idles out after half a second, exit 0
        names = fleet.grow(1)
        wait_for(lambda names=names: _gone(fleet, names), 30, "the worker to idle out")
    names = fleet.grow(CRASH_LOOP)  # told to go at once
    time.sleep(0.2)
    fleet.delete(names)
    wait_for(lambda: _gone(fleet, names), 30, "the workers to go")
    assert fleet.grow(1)  # no failure counted: more may start
    fleet.delete([i.name for i in fleet.instances()])
    assert fleet.wait_empty(30)
