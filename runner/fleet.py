"""The fleet of workers, and the policy that sizes it as a run's work drains.

A **fleet** is a set of named worker instances: processes on this machine, or VMs in a managed
instance group. The runner grows it to the work at hand and shrinks it by deleting *idle*
instances by name, never by blindly lowering a size (which can kill a busy VM).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from worker import defaults


@dataclass(frozen=True)
class Instance:
    name: str
    status: str = "running"  # "starting" | "running" | "stopping"
    # Why the instance is not (or will never be) doing work, e.g. "QUOTA_EXCEEDED: ..." for
    # one the group cannot create, "failed to boot: ..." for a VM whose worker never started.
    # Such an instance is not capacity (runner.policy).
    error: str | None = None
    removable: bool = False  # exists but will never work: the runner deletes it


class Fleet(ABC):
    @abstractmethod
    def instances(self) -> list[Instance]:
        """Instances that exist now (including ones still starting)."""

    @abstractmethod
    def grow(self, count: int) -> list[str]:
        """Add ``count`` instances; their names."""

    @abstractmethod
    def delete(self, names: Iterable[str]) -> None:
        """Remove these instances (the caller has checked they are idle)."""

    def wait_empty(self, timeout: float) -> bool:
        """Wait for deleted instances to be gone; True when none is left."""
        return not self.instances()

    def problems(self) -> list[str]:
        """One line per thing the user should know about the fleet (quota, failed boots)."""
        return []

    max_size: int | None = None  # the most instances the fleet can hold, where it has a limit

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients."""


class LocalFleet(Fleet):
    """Worker processes on this machine, registered under ``<store>/fleet/`` so a later
    ``runner watch`` finds them. They run in their own session: Ctrl-C in the runner's terminal
    detaches the runner without stopping them."""

    def __init__(
        self,
        root: Path,
        *,
        slots: int = 1,
        idle_timeout: float = defaults.IDLE_TIMEOUT,
        extra_args: list[str] | None = None,
    ):
        self.root = root.resolve()
        self.registry = self.root / "fleet"
        self.registry.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self.idle_timeout = idle_timeout
        self.extra_args = extra_args or []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping: set[str] = set()

    def _entries(self) -> dict[str, int]:
        out = {}
        for path in self.registry.glob("*.json"):
            try:
                out[path.stem] = int(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                continue
        return out

    def instances(self) -> list[Instance]:
        live = []
        for name, pid in sorted(self._entries().items()):
            proc = self._procs.get(name)
            alive = proc.poll() is None if proc is not None else self._alive(name, pid)
            if alive:
                live.append(Instance(name, "stopping" if name in self._stopping else "running"))
            else:
                (self.registry / f"{name}.json").unlink(missing_ok=True)
                self._procs.pop(name, None)
                self._stopping.discard(name)
        return live

    def grow(self, count: int) -> list[str]:
        names = []
        taken = set(self._entries())
        n = 0
        for _ in range(count):
            while f"local-{n}" in taken:
                n += 1
            name = f"local-{n}"
            taken.add(name)
            logs = self.root / "fleet" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            with (logs / f"{name}.log").open("ab") as log:
                proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "worker",
                        "--backend",
                        "local",
                        "--store",
                        str(self.root),
                        "--name",
                        name,
                        "--slots",
                        str(self.slots),
                        "--idle-timeout",
                        str(self.idle_timeout),
                        *self.extra_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._procs[name] = proc
            (self.registry / f"{name}.json").write_text(json.dumps({"pid": proc.pid}))
            names.append(name)
        return names

    def delete(self, names: Iterable[str]) -> None:
        entries = self._entries()
        for name in names:
            pid = entries.get(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            self._stopping.add(name)

    def wait_empty(self, timeout: float) -> bool:
        import time

        deadline = time.monotonic() + timeout
        while self.instances():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _alive(self, name: str, pid: int) -> bool:
        return _is_worker(pid, self.root, name)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one worker (tests and demos of preemption)."""
        pid = self._entries().get(name)
        if pid is not None and (name in self._procs or self._alive(name, pid)):
            os.kill(pid, sig)


def _is_worker(pid: int, store: Path, name: str) -> bool:
    """Whether ``pid`` is still this store's worker ``name`` (and not a reused pid)."""
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
    return flags.get(b"--store") == str(store).encode() and flags.get(b"--name") == name.encode()
