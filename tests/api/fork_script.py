"""Run by test_fork_start.py in a process of its own (one thread, as a script's is): local
workers forked from it, and what it prints about them as one JSON line.

    python fork_script.py hold STORE FLAG      two items that wait for FLAG, watched to the end
    python fork_script.py idle STORE           a run's worker with nothing to do, left alone
    python fork_script.py standby STORE        a launcher's two workers forked ahead: one is
                                               asked for, the other goes as the launcher closes
    python fork_script.py killed STORE         its one worker forked ahead is killed before it
                                               is asked for: the worker asked for is forked then
    python fork_script.py map STORE            values and a failure through forked workers (and
                                               their forked task hosts), then a map more
    python fork_script.py nested STORE         a function that maps with cflow.map itself
    python fork_script.py random STORE         two forked task hosts draw random numbers
    python fork_script.py threaded STORE       the same while another thread runs
    python fork_script.py again STORE          maps one after another into one store, each
                                               with forked workers
    python fork_script.py kept STORE           three maps through one kept launcher, the
                                               caller's environment, folder and import path
                                               changed before each
    python fork_script.py frozen STORE         a kept launcher stopped (SIGSTOP) between maps
    python fork_script.py replaced STORE       a kept launcher killed between maps, a forked
                                               child's maps, one left idle past its time, a
                                               caller too large to keep one
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cflow
from cflow.driver import let_go
from runner.backends.local import kept as keeping
from runner.backends.local import launcher as launching
from runner.backends.local.fleet import LocalFleet
from runner.backends.local.launcher import (
    Launcher,
    can_fork,
    process_start,
    used_by_this_thread,
)
from worker.executors import reaper

WAIT_SECONDS = 60.0  # how long the script waits for its workers to take the items


def wait_for(flag: str) -> str:
    while not Path(flag).exists():
        time.sleep(0.02)
    return flag


def entries(store: Path) -> dict[str, Any]:
    """The registry's entries, each with its process's command line."""
    out = {}
    for path in sorted((store / "fleet" / "live").glob("*.json")):
        entry = json.loads(path.read_text())
        entry["cmdline"] = Path(f"/proc/{entry['pid']}/cmdline").read_bytes().decode()
        out[path.stem] = entry
    return out


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def hold(store: Path, flag: str) -> None:
    held = (store.parent / "held.txt").open("w")  # no worker may keep this open
    run = cflow.submit(wait_for, [flag, flag], store=store, workers=2, chunk_size=1, progress=False)
    deadline = time.monotonic() + WAIT_SECONDS
    while run.progress().running < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the two items were not taken")
        time.sleep(0.02)
    say(run=run.id, pid=os.getpid(), workers=entries(store), held=held.name)
    say(cancelled=run.wait().cancelled)


def idle(store: Path) -> None:
    launcher = Launcher.start()
    assert launcher is not None, "a one-thread script forks its workers"
    fleet = LocalFleet(store, run_id="r-idle", idle_timeout=0.5)
    with used_by_this_thread(launcher):
        fleet.grow(1)
    say(workers=entries(store))
    launcher.close()


def standby(store: Path) -> None:
    launcher = Launcher.start(standby=2)
    assert launcher is not None, "a one-thread script forks its workers"
    deadline = time.monotonic() + WAIT_SECONDS
    while len(ahead := reaper.children(launcher.pid)) < 2:  # forked before anything asks
        if time.monotonic() > deadline:
            raise RuntimeError(f"the launcher forked {ahead} ahead")
        time.sleep(0.01)
    started = {pid: process_start(pid) for pid in ahead}
    fleet = LocalFleet(store, run_id="r-standby", idle_timeout=0.5)
    with used_by_this_thread(launcher):
        fleet.grow(1)
    launcher.close()
    say(ahead=started, workers=entries(store))


def killed(store: Path) -> None:
    launcher = Launcher.start(standby=1)
    assert launcher is not None, "a one-thread script forks its workers"
    deadline = time.monotonic() + WAIT_SECONDS
    while not (ahead := reaper.children(launcher.pid)):
        if time.monotonic() > deadline:
            raise RuntimeError("the launcher forked none ahead")
        time.sleep(0.01)
    (standby,) = ahead
    os.kill(standby, signal.SIGKILL)
    while process_start(standby) is not None:  # dead (a zombie, or reaped) before the ask
        time.sleep(0.01)
    fleet = LocalFleet(store, run_id="r-killed", idle_timeout=0.5)
    with used_by_this_thread(launcher):
        fleet.grow(1)
    launcher.close()
    say(killed=standby, workers=entries(store))


def with_worker(x: int) -> tuple[int, str, str]:
    """The value, the command line of the worker that ran it (the task host's parent), and
    the task host's own."""
    own = Path("/proc/self/cmdline").read_bytes().decode()
    return abs(x), Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode(), own


def inverse(x: int) -> float:
    return 1 / x


def mapped(store: Path) -> None:
    # One chunk of the three: its items run one after another in one task host.
    values = list(
        cflow.map(with_worker, [-1, -2, -3], store=store / "a", chunk_size=3, progress=False)
    )
    try:
        cflow.map(inverse, [1, 0], store=store / "b", workers=1, progress=False)
        failed: dict[str, Any] = {}
    except cflow.ShardFailed as exc:
        failed = {"index": exc.index, "type": exc.type_name, "traceback": exc.traceback}
    let_go()  # the launcher for the maps after these is ready
    again = list(
        cflow.map(with_worker, [-4, -5, -6], store=store / "c", chunk_size=3, progress=False)
    )
    say(values=values, failed=failed, again=again)


def map_within(x: int) -> list[tuple[int, str]]:
    """Maps from its own task host: each value with the command line of the worker that ran
    it. The launcher, the worker and the task host this runs in were each forked while their
    parent held a lock of its own (a launcher's, a worker's children's, its spare hosts')."""
    inner = cflow.map(with_worker, [x, -x], workers=1, progress=False)
    return [(value, worker) for value, worker, _ in inner]


def nested(store: Path) -> None:
    outer = cflow.map(map_within, [1, 2], store=store, timeout=60, retries=0, progress=False)
    say(values=list(outer))


def draw_together(folder: str) -> tuple[int, str, float, float]:
    """Once two task hosts hold an item each (each leaves its pid in ``folder``): this host's
    pid and command line, and a number from ``random`` and from NumPy's global generator."""
    import numpy

    Path(folder, str(os.getpid())).touch()
    deadline = time.monotonic() + WAIT_SECONDS
    while len(list(Path(folder).iterdir())) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the other item was not taken")
        time.sleep(0.02)
    own = Path("/proc/self/cmdline").read_bytes().decode()
    return os.getpid(), own, random.random(), float(numpy.random.rand())


def drawn(store: Path) -> None:
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # a BLAS thread pool would make this process spawn its workers
    import numpy  # imported before the run: the hosts are forked with its generator's state

    numpy.random.rand()
    folder = store / "pids"
    folder.mkdir()
    items = [str(folder)] * 2
    draws = cflow.map(draw_together, items, store=store / "a", workers=2, progress=False)
    say(draws=list(draws))


def opened_in(store: Path) -> list[str]:
    """The files of ``store`` this process has open."""
    fds = Path("/proc/self/fd")
    found = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(fds / fd)
        except OSError:  # the listing's own descriptor, gone
            continue
        if target.startswith(str(store)):
            found.append(target)
    return sorted(found)


def again(store: Path) -> None:
    """Each map forks its workers while this process has the store open from the maps before
    (its records read, its runs' threads ended): they must not share its SQLite state. Once a
    map's values are read and its thread has ended, nothing of the store is left open here."""
    values, forked, left_open = [], [], []
    for _ in range(4):
        run = cflow.submit(abs, range(-2000, 0), store=store, workers=2, progress=False)
        values.append(list(run.results()))
        let_go()  # its threads end: the next map may fork
        left_open.append(opened_in(store))
        run.progress()  # the store open again here as the next map forks
        forked.append(can_fork())
    say(values=values, forked=forked, left_open=left_open)


def look(_: int) -> dict[str, Any]:
    """What a worker was started with, as its task host sees it: an environment variable, a
    module found on the import path alone, and the worker's working folder."""
    import importlib

    try:
        module: Any = importlib.import_module("cflow_kept_mark").VALUE
    except ImportError:
        module = None
    fds = Path("/proc/self/fd")
    logs = []  # where the host writes between tasks: its worker's log
    for fd in os.listdir(fds):
        with contextlib.suppress(OSError):
            if "/fleet/logs/" in (target := os.readlink(fds / fd)):
                logs.append(target)
    return {
        "env": os.environ.get("CFLOW_KEPT_MARK"),
        "module": module,
        "worker_cwd": os.readlink(f"/proc/{os.getppid()}/cwd"),
        "worker": os.getppid(),
        "host_logs": sorted(set(logs)),
        "worker_log": os.readlink(f"/proc/{os.getppid()}/fd/2"),
    }


def waiting_ahead(launcher: Launcher) -> dict[int, list[int]]:
    """The launcher's workers forked ahead, each with its spare task hosts."""
    return {pid: reaper.children(pid) for pid in reaper.children(launcher.pid)}


def kept(store: Path) -> None:
    """Each map changes the caller first: its workers must see the caller as it is then, not
    as it was when the launcher was forked (before the first map)."""
    rounds = []
    for k in range(3):
        folder = store / f"folder-{k}"
        folder.mkdir(parents=True)
        (folder / "cflow_kept_mark.py").write_text(f"VALUE = {k}\n")
        sys.path.insert(0, str(folder))
        os.environ["CFLOW_KEPT_MARK"] = str(k)
        os.chdir(folder)
        values = list(cflow.map(look, [0, 1], store=store / "s", workers=2, progress=False))
        let_go()
        launcher = keeping.kept()
        assert launcher is not None, "a small caller keeps its launcher"
        ahead = waiting_ahead(launcher)
        rounds.append({"values": values, "launcher": launcher.pid, "ahead": ahead})
        sys.path.remove(str(folder))
    say(rounds=rounds, folders=[str(store / f"folder-{k}") for k in range(3)])


def replaced(store: Path) -> None:
    values = list(cflow.map(abs, [-1, -2], store=store, workers=2, progress=False))
    let_go()
    first = keeping.kept()
    assert first is not None
    first_ahead = waiting_ahead(first)
    os.kill(first.pid, signal.SIGKILL)
    while process_start(first.pid) is not None:
        time.sleep(0.01)
    values += cflow.map(abs, [-3, -4], store=store, workers=2, progress=False)
    let_go()
    second = keeping.kept()
    assert second is not None
    # A child forked from this process maps with a launcher of its own, never its parent's.
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 1
        try:
            got = list(cflow.map(abs, [-5, -6], store=store, workers=2, progress=False))
            let_go()
            own = keeping.kept()
            os.write(write, json.dumps({"values": got, "launcher": own and own.pid}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as fh:
        in_child = json.loads(fh.read() or "{}")
    os.waitpid(child, 0)
    values += cflow.map(abs, [-7, -8], store=store, workers=2, progress=False)
    let_go()
    launcher = keeping.kept()
    after_child = launcher.pid if launcher is not None else None
    # One left idle past its time exits (its workers ahead with it); the next map forks another.
    keeping.close_kept()
    os.environ["CFLOW_LAUNCHER_IDLE_SECONDS"] = "0.5"
    values += cflow.map(abs, [-11, -12], store=store, workers=2, progress=False)
    let_go()
    idle = keeping.kept()
    assert idle is not None
    idle_ahead = waiting_ahead(idle)
    deadline = time.monotonic() + WAIT_SECONDS
    while process_start(idle.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    idle_exited = process_start(idle.pid) is None
    while any(process_start(int(p)) is not None for p in idle_ahead):
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    idle_ahead_gone = not any(process_start(int(p)) is not None for p in idle_ahead)
    del os.environ["CFLOW_LAUNCHER_IDLE_SECONDS"]
    values += cflow.map(abs, [-13, -14], store=store, workers=2, progress=False)
    let_go()
    launcher = keeping.kept()
    after_idle = launcher.pid if launcher is not None else None
    # A caller larger than the limit forks none: its run's workers are new interpreters, then
    # one started as a new interpreter is kept, and forks the next map's workers.
    keeping.close_kept()
    keeping.KEEP_RSS = 0
    values += cflow.map(abs, [-9, -10], store=store, workers=2, progress=False)
    let_go()
    large = keeping.kept()
    spawned = Path(f"/proc/{large.pid}/cmdline").read_bytes().decode() if large else ""
    then = cflow.map(with_worker, [-15], store=store, workers=1, progress=False)
    let_go()
    say(
        large_launcher=spawned,
        large_then=[then[0][0], then[0][1]],
        first=first.pid,
        first_ahead=first_ahead,
        second=second.pid,
        after_child=after_child,
        child=in_child,
        kept_when_large=large and large.pid,
        children_when_large=reaper.children(os.getpid()),
        values=values,
        idle=idle.pid,
        idle_ahead=idle_ahead,
        idle_exited=idle_exited,
        idle_ahead_gone=idle_ahead_gone,
        after_idle=after_idle,
    )


def frozen(store: Path) -> None:
    """A kept launcher stopped between maps answers nothing: the next map gives up on it after
    the wait for an answer, kills it and spawns its workers; the map after forks another."""
    values = list(cflow.map(abs, [-1, -2], store=store, workers=2, progress=False))
    let_go()
    first = keeping.kept()
    assert first is not None
    launching.ASK_SECONDS = 1.0
    os.kill(first.pid, signal.SIGSTOP)
    began = time.monotonic()
    values += cflow.map(abs, [-3, -4], store=store, workers=2, progress=False)
    took = time.monotonic() - began
    let_go()
    first_gone = process_start(first.pid) is None  # killed, and reaped
    values += cflow.map(abs, [-5, -6], store=store, workers=2, progress=False)
    let_go()
    second = keeping.kept()
    say(
        values=values,
        took=took,
        first_gone=first_gone,
        first=first.pid,
        second=second.pid if second is not None else None,
    )


def threaded(store: Path) -> None:
    release = threading.Event()
    other = threading.Thread(target=release.wait)
    other.start()
    try:
        mapped(store)
    finally:
        release.set()
        other.join()


MODES = {
    "idle": idle,
    "standby": standby,
    "killed": killed,
    "map": mapped,
    "random": drawn,
    "nested": nested,
    "again": again,
    "kept": kept,
    "replaced": replaced,
    "frozen": frozen,
    "threaded": threaded,
}

if __name__ == "__main__":
    mode, where = sys.argv[1], Path(sys.argv[2])
    if mode == "hold":
        hold(where, sys.argv[3])
    else:
        MODES[mode](where)
