"""The local fleet's registry: a file per live worker under ``<store>/fleet/live/``, so any
runner (a later ``runner watch``, ``runner status``) finds the workers of a store and tells
them from other processes that reused their pids."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from pathlib import Path

from runner.backends.local.launcher import process_start

CLAIM_SECONDS = 60.0  # a worker name claimed this long without a pid is free again
NEXT_HINT = ".next"  # in fleet/logs/: the number the next name is looked for from


class Registry:
    """``<store>/fleet/live/<name>.json``: ``{"pid", "run", "start"}``, ``start`` the pid's
    start time (clock ticks since boot), which tells the worker from a later process given its
    pid. An entry without one (an earlier version's) is told by the command line instead.

    A name is claimed by creating its file create-only, so two runners starting workers in one
    store at once never give two workers one name; the pid is written once the process runs.
    The entries have a folder of their own: ``fleet/`` keeps what every worker ever left (its
    log, its lifetime record), and a store that ran a thousand maps would make every look at
    the live workers a listing of thousands.
    """

    def __init__(self, root: Path, run_id: str | None):
        self.root = root
        self.folder = root / "fleet" / "live"
        self.logs = root / "fleet" / "logs"
        if not self.folder.is_dir():  # this version's first look at the store
            self.folder.mkdir(parents=True, exist_ok=True)
            _adopt(root / "fleet", self.folder)
        self.run_id = run_id

    def entries(self) -> dict[str, tuple[int, int | None]]:
        """The registered workers (a run's own, or every one): name -> pid and, for a forked
        one, its start time."""
        out = {}
        for path in self.folder.glob("*.json"):
            try:
                entry = json.loads(path.read_text())
                pid = int(entry["pid"])
                start = entry.get("start")
                if self.run_id is None or entry.get("run") == self.run_id:
                    out[path.stem] = (pid, None if start is None else int(start))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                # A name claimed by a runner still starting its process; a claim that never
                # got a pid (its runner died in between) is given back after a while.
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime > CLAIM_SECONDS:
                        path.unlink()
                continue
        return out

    def claim(self, start: int) -> tuple[str, int]:
        """The first ``local-<n>`` from ``start`` never given in this store, claimed create-only.

        A name is given once: its worker's log (``fleet/logs/<name>.log``, made here with the
        claim) stays when the worker is gone, and a runner keeps what it did to a worker by
        name (deleted, heard stopping). Two fleets of one run count from 0 each (the submit's,
        which starts the first workers, and its watch's): a name whose worker had exited would
        otherwise be given again, to a worker the watch then took for the one that left.
        """
        logs = self.logs
        logs.mkdir(exist_ok=True)
        # From past the names given (a store that ran a thousand maps has given two thousand),
        # as the hint says, else as the logs' listing says. The hint need not be exact: a name
        # it says is free whose log is there is passed over below, as a claim racing this one.
        n = max(start, _hint(logs) or _highest(os.listdir(logs)) + 1)
        while True:
            name = f"local-{n}"
            if (logs / f"{name}.log").exists():
                n += 1
                continue
            try:
                fd = os.open(self.folder / f"{name}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                n += 1
                continue
            os.close(fd)
            (logs / f"{name}.log").touch()
            with contextlib.suppress(OSError):  # only a hint: a claim without it lists the logs
                (logs / NEXT_HINT).write_text(str(n + 1))
            return name, n

    def record(self, name: str, pid: int, start: int | None) -> None:
        """Worker ``name`` runs as ``pid``: readers see the claim or the pid, never half."""
        entry = self.folder / f"{name}.json"
        tmp = entry.with_name(f".{name}.json.tmp")
        data: dict[str, object] = {"pid": pid, "run": self.run_id}
        if start is not None:
            data["start"] = start
        tmp.write_text(json.dumps(data))
        os.replace(tmp, entry)

    def forget(self, name: str) -> None:
        (self.folder / f"{name}.json").unlink(missing_ok=True)

    def alive(self, name: str, pid: int, start: int | None) -> bool:
        """Whether ``pid`` is still this store's worker ``name`` (and not a reused pid)."""
        if start is not None:
            return process_start(pid) == start
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
            with open(f"/proc/{pid}/stat", "rb") as fh:
                zombie = fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z"
        except OSError:
            return False
        if zombie:
            return False
        flags = dict(itertools.pairwise(argv))  # "--store" -> its value, ...
        store = str(self.root).encode()
        return flags.get(b"--store") == store and flags.get(b"--name") == name.encode()


def _adopt(fleet: Path, live: Path) -> None:
    """The entries an earlier version kept in ``fleet/`` itself, moved into ``live/`` once, so
    the workers its runners started (still running through an upgrade) are known."""
    for path in fleet.glob("*.json"):
        with contextlib.suppress(OSError):  # another runner moved it first
            os.replace(path, live / path.name)


def _hint(logs: Path) -> int | None:
    """The next name's number, as the last claim in this store wrote it (None: none read)."""
    try:
        text = (logs / NEXT_HINT).read_text()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _highest(logs: list[str]) -> int:
    """The highest ``n`` of the ``local-<n>.log`` files listed (-1: none)."""
    highest = -1
    for log in logs:
        number = log.removeprefix("local-").removesuffix(".log")
        if number.isdigit() and log != number:
            highest = max(highest, int(number))
    return highest
