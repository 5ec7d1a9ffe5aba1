"""Local workers of a run made from Python are forked from the caller when it has one thread:
they are workers as ``python -m worker`` would be (own session, stdin from /dev/null, output
to their log, none of the caller's files), the fleet recognises them by pid and start time
(``runner status``, ``runner cancel``, scale-down), they stop when idle, and a caller with
other threads spawns its workers as before. Each case runs the caller as a script of its own
(``fork_script.py``): a test process has threads of its own."""

from __future__ import annotations

import functools
import itertools
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.backends.local.fleet import LocalFleet
from runner.backends.local.launcher import process_start
from tests.e2e.conftest import wait_for
from worker.backends.local.records import QUEUE_FILE
from worker.executors import reaper

SCRIPT = Path(__file__).with_name("fork_script.py")
REPO = Path(__file__).parents[2]
EXIT_SECONDS = 30.0  # how long a worker told to stop, or idle, may take to exit


def _script(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CFLOW_")},
    )


def _line(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the script ended early ({proc.wait()})"
    reply: dict[str, Any] = json.loads(line)
    return reply


def _exited(pid: int, start: int) -> bool:
    """Wait for a process that is not our child to exit (a pidfd); whether it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if process_start(pid) == start:
            select.select([fd], [], [], EXIT_SECONDS)
    finally:
        os.close(fd)
    return process_start(pid) != start


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Scripts a test starts; killed if the test ends before them."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _fds(pid: int) -> dict[int, str]:
    """A process's open descriptors: number -> what it points at."""
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def _running_item(pid: int) -> bool:
    """Whether a task host runs its item: input from /dev/null, output to the attempt's log."""
    fds = _fds(pid)
    return fds[0] == os.devnull and fds[1] == fds[2] and fds[1].endswith("log-0.txt")


def _runner(*args: str) -> str:
    """``runner ARGS`` in a process of its own, as a user would run it; its stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "runner", *args], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _kill_workers(workers: dict[str, Any]) -> None:
    for entry in workers.values():
        if process_start(entry["pid"]) == entry.get("start"):
            os.kill(entry["pid"], signal.SIGKILL)


def test_forked_workers_are_listed_and_cancelled(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    store, flag = tmp_path / "store", tmp_path / "flag"
    proc = _script("hold", str(store), str(flag))
    procs.append(proc)
    shown = _line(proc)
    workers = shown["workers"]
    try:
        assert sorted(workers) == ["local-0", "local-1"]  # the later grow forked too
        for name, entry in workers.items():
            pid = entry["pid"]
            assert "-m\0worker" not in entry["cmdline"], "spawned, not forked"
            assert entry["start"] == process_start(pid)
            assert os.getsid(pid) == pid != os.getsid(shown["pid"])  # Ctrl-C does not reach it
            fds = {
                int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")
            }
            assert fds[0] == os.devnull
            assert fds[1] == fds[2] == str(store / "fleet" / "logs" / f"{name}.log")
            assert shown["held"] not in fds.values()  # the caller's open files are not kept
        # Another process's fleet, as `runner status` opens it, recognises them.
        fleet = LocalFleet(store)
        try:
            assert sorted(i.name for i in fleet.instances()) == ["local-0", "local-1"]
        finally:
            fleet.close()
        status = subprocess.run(
            [
                sys.executable,
                "-m",
                "runner",
                "status",
                shown["run"],
                "--store",
                str(store),
                "--json",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        states = [s["state"] for s in json.loads(status.stdout)["shards"]]
        assert states == ["running", "running"]
        subprocess.run(
            [sys.executable, "-m", "runner", "cancel", shown["run"], "--store", str(store)],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        for entry in workers.values():
            assert _exited(entry["pid"], entry["start"]), "a cancelled run's worker went on"
        assert _line(proc) == {"cancelled": True}
        assert proc.wait(EXIT_SECONDS) == 0
    finally:
        _kill_workers(workers)


def test_a_forked_workers_task_host_is_forked_and_dies_with_it(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A forked worker forks its task host as well: the host is the worker's child in a
    session of its own, holding none of the caller's or the worker's files but its pipes and
    logs, and it ends when its worker is killed; the run's cancel ends the other worker and
    its host."""
    store, flag = tmp_path / "store", tmp_path / "flag"
    proc = _script("hold", str(store), str(flag))
    procs.append(proc)
    shown = _line(proc)
    workers = shown["workers"]
    hosts: dict[str, tuple[int, int]] = {}
    try:
        for name, entry in workers.items():
            (host,) = reaper.children(entry["pid"])  # the host running its item, nothing else
            start = process_start(host)
            assert start is not None
            hosts[name] = (host, start)
            cmdline = Path(f"/proc/{host}/cmdline").read_bytes().decode()
            assert str(SCRIPT) in cmdline and "worker.executors.host" not in cmdline, cmdline
            assert os.getsid(host) == host != os.getsid(entry["pid"])
            # The worker says its item started as it hands the host the task; the host then
            # points its input at /dev/null and its output at the attempt's log, and the item
            # waits for the flag: that state stays until the test ends it.
            wait_for(functools.partial(_running_item, host), 30, "the host to take its task")
            fds = _fds(host)
            for target in fds.values():
                assert target != shown["held"] and QUEUE_FILE not in target, fds
                assert target.startswith(("pipe:", os.devnull, str(store))), fds
        (first, first_host), (second, second_host) = sorted(hosts.items())
        os.kill(workers[first]["pid"], signal.SIGKILL)
        assert _exited(*first_host), "a task host outlived its killed worker"
        assert process_start(second_host[0]) == second_host[1], "the other host went too"
        _runner("cancel", shown["run"], "--store", str(store))
        assert _exited(*second_host), "a cancelled run's task host went on"
        assert _exited(workers[second]["pid"], workers[second]["start"])
        assert _line(proc) == {"cancelled": True}
        assert proc.wait(EXIT_SECONDS) == 0
    finally:
        _kill_workers(workers)
        for host, start in hosts.values():
            if process_start(host) == start:
                os.kill(host, signal.SIGKILL)


def test_forked_task_hosts_draw_their_own_random_numbers(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Two task hosts forked from one caller draw different numbers from ``random`` and from
    NumPy's global generator, as two new interpreters would."""
    pytest.importorskip("numpy")
    proc = _script("random", str(tmp_path))
    procs.append(proc)
    first, second = _line(proc)["draws"]
    assert first[0] != second[0]  # two hosts, both forked
    assert str(SCRIPT) in first[1] and str(SCRIPT) in second[1], (first, second)
    assert first[2] != second[2] and first[3] != second[3]
    assert proc.wait(EXIT_SECONDS) == 0


def test_a_forked_worker_stops_when_idle(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    store = tmp_path / "store"
    proc = _script("idle", str(store))
    procs.append(proc)
    (entry,) = _line(proc)["workers"].values()
    try:
        assert "-m\0worker" not in entry["cmdline"]
        assert _exited(entry["pid"], entry["start"]), "an idle worker went on"
        log = (store / "fleet" / "logs" / "local-0.log").read_text()
        assert "worker local-0 exiting: idle" in log, log
        assert proc.wait(EXIT_SECONDS) == 0
    finally:
        _kill_workers({"local-0": entry})


def test_the_first_workers_asked_for_were_forked_ahead_and_the_unused_ones_go(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A launcher told to keep two workers ahead has forked them before any is asked for;
    the one asked for is one of them (told its arguments, not forked then), registered and
    running as a worker; the other exits once the launcher closes."""
    store = tmp_path / "store"
    proc = _script("standby", str(store))
    procs.append(proc)
    shown = _line(proc)
    (entry,) = shown["workers"].values()
    try:
        ahead = {int(pid): start for pid, start in shown["ahead"].items()}
        assert ahead.get(entry["pid"]) == entry["start"], shown  # that very process
        ((unused, start),) = [(p, s) for p, s in ahead.items() if p != entry["pid"]]
        assert _exited(unused, start), "a standby nobody asked for outlived its launcher"
        assert _exited(entry["pid"], entry["start"]), "the worker did not stop when idle"
        log = (store / "fleet" / "logs" / "local-0.log").read_text()
        assert "worker local-0 exiting: idle" in log, log
        assert proc.wait(EXIT_SECONDS) == 0
    finally:
        _kill_workers(shown["workers"])


def test_a_standby_killed_before_it_is_asked_for_is_passed_over(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """The worker asked for is forked then, not the dead standby: it is registered and runs."""
    store = tmp_path / "store"
    proc = _script("killed", str(store))
    procs.append(proc)
    shown = _line(proc)
    (entry,) = shown["workers"].values()
    try:
        assert entry["pid"] != shown["killed"]
        assert entry["start"] == process_start(entry["pid"])  # alive, the one registered
        assert _exited(entry["pid"], entry["start"]), "the worker did not stop when idle"
        log = (store / "fleet" / "logs" / "local-0.log").read_text()
        assert "worker local-0 exiting: idle" in log, log
        assert proc.wait(EXIT_SECONDS) == 0
    finally:
        _kill_workers(shown["workers"])


@pytest.mark.parametrize("mode", ["map", "threaded"])
def test_values_and_failures_come_back_from_forked_or_spawned_workers(
    tmp_path: Path, procs: list[subprocess.Popen[str]], mode: str
) -> None:
    """A one-thread caller's items run in workers forked by a launcher forked from it. A
    caller with another thread running spawns its first run's workers (``python -m worker``),
    then starts a launcher as a new interpreter (``python -m
    runner.backends.local.launcher_process``) whose forks are the next runs' workers. Nothing
    is said of either."""
    proc = _script(mode, str(tmp_path))
    procs.append(proc)
    shown = _line(proc)
    assert [value for value, _, _ in shown["values"]] == [1, 2, 3]
    assert [value for value, _, _ in shown["again"]] == [4, 5, 6]
    spawned = "\0-m\0worker\0--backend\0local\0"
    by_launcher = "\0-m\0runner.backends.local.launcher_process\0"
    for _, worker, host in shown["values"]:
        assert (spawned in worker) == (mode == "threaded"), worker
        assert (str(SCRIPT) in worker) == (mode == "map"), worker
        # Either worker forks its task host: no new interpreter, the worker's command line.
        assert host == worker and "worker.executors.host" not in host, host
    for _, worker, host in shown["again"]:
        assert spawned not in worker, worker
        assert (by_launcher in worker) == (mode == "threaded"), worker
        assert (str(SCRIPT) in worker) == (mode == "map"), worker
        assert host == worker, host
    failed = shown["failed"]
    assert failed["index"] == 1 and failed["type"] == "builtins.ZeroDivisionError"
    assert "return 1 / x" in failed["traceback"]
    assert proc.wait(EXIT_SECONDS) == 0


def test_a_function_that_maps_with_cflow_itself_gets_its_values(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """Each task host was forked while its worker held the lock on its children and spares,
    and the launcher while the caller held the kept launcher's: a ``cflow.map`` in the
    function waited on one of them until its timeout. A fork's child now starts with none of
    them held, and the inner map's workers are forked too."""
    proc = _script("nested", str(tmp_path / "store"))
    procs.append(proc)
    shown = _line(proc)
    assert [[value for value, _ in inner] for inner in shown["values"]] == [[1, 1], [2, 2]]
    for inner in shown["values"]:
        for _, worker in inner:
            assert str(SCRIPT) in worker, worker  # forked, down from this script's process
    assert proc.wait(EXIT_SECONDS) == 0


def test_maps_one_after_another_into_one_store_each_fork_their_workers(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """The caller has the store open from the maps before each fork (SQLite keeps one record
    per file and process, which a forked child would share): every map's values come back.
    And a map leaves nothing of the store open in the caller once its values are read and
    its thread has ended (its connections were left to the collector before)."""
    proc = _script("again", str(tmp_path / "store"))
    procs.append(proc)
    shown = _line(proc)
    assert shown["values"] == [list(range(2000, 0, -1))] * 4
    assert shown["forked"] == [True] * 4  # each map after the first forked its workers too
    assert shown["left_open"] == [[]] * 4
    assert proc.wait(EXIT_SECONDS) == 0


def test_a_kept_launcher_starts_each_runs_workers_as_the_caller_is_then(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """One launcher serves a script's maps one after another, with as many workers forked
    ahead again after each (each with its spare task host); yet every map's workers have the
    environment, working folder and import path the caller has at that map, not those it had
    when the launcher was forked; and a task host forked ahead writes its own output to its
    worker's log, as one forked later does."""
    proc = _script("kept", str(tmp_path))
    procs.append(proc)
    shown = _line(proc)
    rounds, folders = shown["rounds"], shown["folders"]
    assert len({r["launcher"] for r in rounds}) == 1, rounds  # the same launcher throughout
    used: set[int] = set()
    for k, r in enumerate(rounds):
        for value in r["values"]:
            assert value["env"] == str(k) and value["module"] == k, (k, r)
            assert value["worker_cwd"] == folders[k], (k, r)
            # A host forked ahead, before its worker had a log, writes its own there too.
            assert value["host_logs"] == [value["worker_log"]], value
            used.add(value["worker"])
        assert len(r["ahead"]) == 2, r  # forked ahead again once the run let its workers go
        assert all(len(hosts) == 1 for hosts in r["ahead"].values()), r  # a spare host each
    # The workers of each map were those waiting ahead after the map before.
    for before, after in itertools.pairwise(rounds):
        assert {v["worker"] for v in after["values"]} <= {int(p) for p in before["ahead"]}
    assert proc.wait(EXIT_SECONDS) == 0


def test_a_launcher_gone_or_not_ours_is_replaced_and_a_large_caller_forks_none(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A kept launcher that was killed is replaced at the next map (its workers waiting ahead
    go with it); a child forked from the caller maps with a launcher of its own and leaves the
    parent's to the parent; one left idle past its time exits, its workers ahead with it, and
    the next map forks another; a caller using more memory than the limit forks none (every
    worker forked from it would map all of it): its run's workers are new interpreters, then a
    launcher started as one is kept and forks the next map's workers."""
    proc = _script("replaced", str(tmp_path / "store"))
    procs.append(proc)
    shown = _line(proc)
    assert shown["values"] == [1, 2, 3, 4, 7, 8, 11, 12, 13, 14, 9, 10]
    assert shown["second"] != shown["first"]
    for pid in shown["first_ahead"]:
        assert process_start(int(pid)) is None, "a worker ahead outlived its killed launcher"
    child = shown["child"]
    assert child["values"] == [5, 6] and child["launcher"] not in (None, shown["second"])
    assert shown["after_child"] == shown["second"]
    assert shown["children_when_large"] == [shown["kept_when_large"]], shown
    assert "runner.backends.local.launcher_process" in shown["large_launcher"]
    assert shown["large_then"][0] == 15  # its worker forked by that launcher, no fork of ours
    assert "runner.backends.local.launcher_process" in shown["large_then"][1]
    # Left idle past its time, it exited with its workers ahead; the next map forked another.
    assert shown["idle_exited"] and shown["after_idle"] not in (None, shown["idle"])
    assert len(shown["idle_ahead"]) == 2 and shown["idle_ahead_gone"], shown
    assert proc.wait(EXIT_SECONDS) == 0


def test_a_kept_launcher_that_stopped_answering_is_killed_and_replaced(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A kept launcher frozen (SIGSTOP) between maps never answers: the next map waits for it
    only so long (here 1 s), kills it, and runs on workers of its own; the map after forks a
    new launcher. The map never hangs."""
    proc = _script("frozen", str(tmp_path / "store"))
    procs.append(proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    assert ready, "the map with a frozen launcher hung"
    shown = _line(proc)
    assert shown["values"] == [1, 2, 3, 4, 5, 6]
    assert 1.0 <= shown["took"] < 60, shown
    assert shown["first_gone"], "the frozen launcher was left"
    assert shown["second"] not in (None, shown["first"])
    assert proc.wait(EXIT_SECONDS) == 0
