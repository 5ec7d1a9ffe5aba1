"""The local fleet's registry gives a worker name once per store, whichever fleet asks, and
tells a worker from a later process given its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from runner.backends.local.fleet import LocalFleet
from runner.backends.local.launcher import process_start
from runner.backends.local.registry import Registry


def test_a_name_whose_worker_is_gone_is_not_given_again(tmp_path: Path) -> None:
    """Two fleets of one run (the submit's and its watch's) both count from 0: a name whose
    worker exited, its entry gone, still belongs to that worker; the next one is new."""
    submits = Registry(tmp_path, "r-1")
    first, _ = submits.claim(0)
    second, _ = submits.claim(1)
    submits.record(first, 101, None)
    submits.record(second, 102, None)
    submits.forget(first)  # local-0 exited: its entry goes, its log stays
    watchs = Registry(tmp_path, "r-1")
    third, n = watchs.claim(0)
    assert (first, second, third, n) == ("local-0", "local-1", "local-2", 2)
    assert (tmp_path / "fleet" / "logs" / "local-2.log").exists()  # given from now on
    other_run = Registry(tmp_path, "r-2")
    assert other_run.claim(0)[0] == "local-3"  # names are the store's, not a run's


def test_a_store_that_ran_many_workers_lists_only_its_live_ones(tmp_path: Path) -> None:
    """What past workers left (a log and a lifetime record each, kept) is not looked through:
    a claim starts past the highest name given, and the entries are the live workers' alone."""
    logs = tmp_path / "fleet" / "logs"
    logs.mkdir(parents=True)
    for n in range(500):
        (logs / f"local-{n}.log").touch()
        (tmp_path / "fleet" / f"local-{n}").mkdir()
        (tmp_path / "fleet" / f"local-{n}" / "lifetime.json").write_text("{}")
    (logs / "notes.txt").touch()  # not a worker's: ignored
    registry = Registry(tmp_path, "r-1")
    name, n = registry.claim(0)
    assert (name, n) == ("local-500", 500)
    registry.record(name, 101, None)
    assert registry.entries() == {"local-500": (101, None)}
    assert sorted(p.name for p in registry.folder.iterdir()) == ["local-500.json"]
    assert Registry(tmp_path, "r-1").claim(3) == ("local-501", 501)
    # The next name's hint, behind (two claims raced) or unreadable: names given are skipped.
    (logs / ".next").write_text("499")
    assert Registry(tmp_path, "r-1").claim(0) == ("local-502", 502)
    (logs / ".next").write_text("not a number")
    assert Registry(tmp_path, "r-1").claim(0) == ("local-503", 503)


def test_two_claims_at_once_get_two_names(tmp_path: Path) -> None:
    a, b = Registry(tmp_path, "r-1"), Registry(tmp_path, "r-1")
    assert {a.claim(0)[0], b.claim(0)[0]} == {"local-0", "local-1"}


def test_a_worker_is_told_by_its_pid_and_start_time(tmp_path: Path) -> None:
    """A live process under its recorded start time is the worker; the same pid under another
    start time is a later process that was given the pid; an ended one is no worker."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        registry = Registry(tmp_path, "r-1")
        start = process_start(proc.pid)
        assert start is not None
        assert registry.alive("local-0", proc.pid, start)
        assert not registry.alive("local-0", proc.pid, start - 1)  # the pid, reused
    finally:
        proc.kill()
        proc.wait()
    assert not registry.alive("local-0", proc.pid, start)


def test_a_spawned_worker_is_registered_with_its_start_time(tmp_path: Path) -> None:
    """Another fleet (the run's watch, `runner status`) knows a spawned worker by its pid and
    start time, never by reading its command line."""
    store = tmp_path / "store"
    fleet = LocalFleet(store, run_id="r-1", idle_timeout=30)
    (name,) = fleet.grow(1)  # no launcher on this thread: a new interpreter
    try:
        entry = json.loads((store / "fleet" / "live" / f"{name}.json").read_text())
        assert entry["start"] == process_start(entry["pid"]), entry
        other = LocalFleet(store, run_id="r-1")
        assert [i.name for i in other.instances()] == [name]
    finally:
        fleet.delete([name])
        assert fleet.wait_empty(30)


def test_another_fleet_of_the_run_wakes_when_one_of_its_workers_exits(tmp_path: Path) -> None:
    """The run's watch did not start the workers the submit did, yet its drain after the run
    looks again as soon as one exits (a pidfd on each registered worker), not a pace later."""
    store = tmp_path / "store"
    starter = LocalFleet(store, run_id="r-1", idle_timeout=30)
    (name,) = starter.grow(1)
    watch = LocalFleet(store, run_id="r-1")
    assert [i.name for i in watch.instances()] == [name]
    starter.delete([name])  # SIGTERM: it stops and exits
    began = time.monotonic()
    while watch.instances():
        assert watch.wait_for_an_exit(20.0)
        assert time.monotonic() - began < 20.0  # woken by the exit, not by the 20 s
    assert watch.instances() == []
    assert starter.wait_empty(30)


def test_the_entries_an_earlier_version_kept_in_fleet_are_adopted_once(tmp_path: Path) -> None:
    """Workers started before an upgrade (their entries in ``fleet/`` itself) are still this
    store's workers: the first registry of this version moves their entries into ``live/``."""
    fleet = tmp_path / "fleet"
    fleet.mkdir()
    me = {"pid": os.getpid(), "run": "r-1", "start": process_start(os.getpid())}
    (fleet / "local-3.json").write_text(json.dumps(me))
    registry = Registry(tmp_path, "r-1")
    assert registry.entries() == {"local-3": (me["pid"], me["start"])}
    assert not (fleet / "local-3.json").exists()
    assert registry.alive("local-3", me["pid"], me["start"])
