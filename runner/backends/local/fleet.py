"""Worker processes on this machine as a :class:`runner.engine.fleet.Fleet`."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from runner.backends.local import launcher as launching
from runner.backends.local.registry import Registry
from runner.engine.fleet import Fleet, Instance
from runner.engine.watch import env_seconds
from worker import defaults
from worker.backends.local.queue import LocalQueue
from worker.backends.local.store import QUEUE_FILE
from worker.errors import CFlowError, DiskFull

log = logging.getLogger("cflow.runner")


class _Process(Protocol):
    """A worker this runner started: spawned (a ``Popen``) or forked by its launcher."""

    pid: int

    def poll(self) -> int | None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


DISK_FULL_BYTES = 1 << 20  # less free space than this on the store's disk: it is full
# A worker gone this soon after it started, not told to go and not saying it left idle (exit 0),
# failed as it started; so many in a row, none living longer, and asking for more stops the
# watch with what the last one said.
QUICK_EXIT = 5.0
CRASH_LOOP = 3
STOPPED_GRACE = 10.0  # seconds a worker may stay stopped (SIGSTOP) before it is taken for frozen


def stopped_grace() -> float:
    """Seconds a stopped worker is given: :data:`STOPPED_GRACE`, or less where its lease and a
    heartbeat are shorter (its shards have gone elsewhere by then)."""
    silence = env_seconds("LEASE_SECONDS") + env_seconds("HEARTBEAT_SECONDS")
    return min(STOPPED_GRACE, silence)


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped by a signal (state ``T``; a debugger's stop, ``t``, is not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[-1].split()[0] == b"T"
    except (OSError, IndexError):
        return False


class WorkersFailToStart(CFlowError):
    """Local workers end as they start, one after another: the watch stops saying why."""

    def __init__(self, names: list[str], root: Path, run_id: str | None):
        log_path = root / "fleet" / "logs" / f"{names[-1]}.log"
        try:
            lines = log_path.read_text(errors="replace").splitlines()
        except OSError:
            lines = []
        last = next((line.strip() for line in reversed(lines) if line.strip()), "nothing")
        again = f"`runner watch {run_id}`" if run_id else "`runner watch RUN`"
        super().__init__(
            f"local workers end as they start ({len(names)} in a row); the last said: {last}"
            f" (its log: {log_path}); the run waits: fix that, then {again}",
            run_id=run_id,
        )


class LocalFleet(Fleet):
    """Worker processes on this machine, registered under ``<store>/fleet/`` so a later
    ``runner watch`` finds them. They run in their own session: Ctrl-C in the runner's terminal
    detaches the runner without stopping them.

    A fleet opened for a run (``run_id``) is that run's alone: its workers are started with
    ``--run`` and receive only that run's shards, in the environment of the runner that started
    them and with the run's slots and options, and it lists, scales and deletes only them. Two
    runs in one store, at once or one after another, never run in each other's workers. A fleet
    opened with no run sees every worker of the store (who holds what, for ``runner status``).

    A name is claimed by creating its registry file create-only, so two runners starting
    workers in one store at once never give two workers one name. When a worker process is
    seen gone, the leases it held are released at once (:meth:`WorkQueue.release`), so its
    shards run again without waiting for the leases to lapse.

    A worker is known by its pid and the pid's start time, both in its registry entry (a pid
    reused by another process has another start time); an entry without a start time (written
    by an earlier version) is told by its command line (``--store``, ``--name``).
    """

    def __init__(
        self,
        root: Path,
        *,
        run_id: str | None = None,
        slots: int = 1,
        idle_timeout: float = defaults.IDLE_TIMEOUT,
        extra_args: list[str] | None = None,
    ):
        self.root = root.resolve()
        self.registry = Registry(self.root, run_id)
        self.run_id = run_id
        self.slots = slots
        self.idle_timeout = idle_timeout
        self.extra_args = extra_args or []
        self._procs: dict[str, _Process] = {}
        self._stopping: set[str] = set()
        self._next = 0  # names are never given twice by one fleet (see _grow)
        self._queue: LocalQueue | None = None
        self.released = 0  # leases released for workers seen gone (bench/recovery.py)
        self._stopped_since: dict[str, float] = {}  # worker -> when first seen stopped
        self._born: dict[str, float] = {}  # worker started here -> when
        self._failed_at_start: list[str] = []  # the latest workers, each gone as it started

    def problems(self) -> list[str]:
        full = self.disk_full()
        return [full] if full else []

    def disk_full(self) -> str | None:
        """Why no worker can write (the store's disk has less than 1 MiB free), or None."""
        try:
            st = os.statvfs(self.root)
        except OSError:
            return None
        if st.f_bavail * st.f_frsize >= DISK_FULL_BYTES:
            return None
        return (
            f"the disk holding {self.root} is full: the workers wait; free some space and the"
            " run goes on where it stopped"
        )

    def instances(self) -> list[Instance]:
        live = []
        now = time.monotonic()
        for name, (pid, start) in sorted(self.registry.entries().items()):
            proc = self._procs.get(name)
            if (proc is not None and proc.poll() is None) or (
                proc is None and self.registry.alive(name, pid, start)
            ):
                status = "stopping" if name in self._stopping else "running"
                live.append(Instance(name, status, *self._frozen(name, pid, now)))
            else:
                self._gone(name)
        return live

    def _frozen(self, name: str, pid: int, now: float) -> tuple[str | None, bool]:
        """Why the worker is no capacity and to be deleted, if it is: stopped by a signal
        (SIGSTOP) for :func:`stopped_grace` seconds or more. A stopped process may hold the
        store's write lock (SQLite's), and every other worker of the store waits on it: the
        run would stall until the lock wait gives up. Deleting it sends SIGCONT with SIGTERM,
        so it ends its transaction and exits; its shards run elsewhere (first commit wins)."""
        if not _stopped(pid):
            self._stopped_since.pop(name, None)
            return None, False
        since = self._stopped_since.setdefault(name, now)
        if now - since < stopped_grace():
            return None, False
        return f"stopped by a signal for {now - since:.0f}s: frozen", True

    def lease_runs(self) -> dict[str, set[str]]:
        """Worker -> the runs whose shards it holds live leases of, from the queue's lease
        records: the truth about which worker works for which run
        (:class:`runner.engine.release.LeaseRecords`)."""
        return self._open_queue().lease_runs()

    def fence(self, names: Iterable[str], allowed: set[str]) -> list[str]:
        """Fence the workers holding leases of ``allowed`` runs only (:meth:`LocalQueue.fence`):
        they lease nothing more, so deleting them never stops one that just took a shard. The
        fence goes with the worker's name once it is gone (:meth:`_gone`)."""
        return self._open_queue().fence(names, allowed)

    def _open_queue(self) -> LocalQueue:
        if self._queue is None:
            self._queue = LocalQueue(self.root / QUEUE_FILE)
        return self._queue

    def _gone(self, name: str) -> None:
        """A worker process ended: free its leases first, then its name."""
        log.debug("worker %s is gone: its leases and its name are let go", name)
        born = self._born.pop(name, None)
        if born is not None and name not in self._stopping:
            proc = self._procs.get(name)
            code = proc.poll() if proc is not None else None
            if time.monotonic() - born < QUICK_EXIT and code != 0:
                self._failed_at_start.append(name)
            else:
                self._failed_at_start.clear()
        try:
            self.released += self._open_queue().release(name)
        except CFlowError as exc:  # the leases lapse by themselves; say why they were kept
            log.warning("could not release the leases of worker %s: %s", name, exc)
        self.registry.forget(name)
        self._procs.pop(name, None)
        self._stopping.discard(name)

    def grow(self, count: int) -> list[str]:
        if len(self._failed_at_start) >= CRASH_LOOP:
            raise WorkersFailToStart(self._failed_at_start, self.root, self.run_id)
        try:
            return self._grow(count)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    f"the disk holding {self.root} is full, so no worker can start; free some"
                    " space, then `runner watch` goes on where the run stopped"
                ) from None
            raise

    def _grow(self, count: int) -> list[str]:
        # A name this fleet gave before is not given again, even once its worker is gone: the
        # runner keeps what it did to a worker by name (deleted, say), which a new worker
        # under the old name would inherit (one forked at once takes the name while the
        # runner still remembers the old one).
        names = []
        for _ in range(count):
            name, n = self.registry.claim(self._next)
            self._next = n + 1
            names.append(name)
        logs = self.root / "fleet" / "logs"
        procs = launching.start_workers([(self._args(n), logs / f"{n}.log") for n in names])
        for i, (name, proc) in enumerate(zip(names, procs, strict=True)):
            # Its pid and start time name the process, whoever looks (another runner's
            # fleet, `runner status`), with no reading of its command line.
            start = (
                proc.start
                if isinstance(proc, launching.ForkedWorker)
                else launching.process_start(proc.pid)
            )
            try:
                self.registry.record(name, proc.pid, start)
            except OSError:  # an unregistered worker would be invisible: stop it and the rest
                for unrecorded in procs[i:]:
                    unrecorded.kill()
                    unrecorded.wait()
                raise
            self._procs[name] = proc
            self._born[name] = time.monotonic()
        return names

    def _args(self, name: str) -> list[str]:
        return [
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
            *(["--run", self.run_id] if self.run_id else []),
            *self.extra_args,
        ]

    def delete(self, names: Iterable[str]) -> None:
        entries = self.registry.entries()
        for name in names:
            pid, start = entries.get(name, (None, None))
            if pid is None:
                log.info("not stopping worker %s: it is not registered (any more)", name)
                continue
            if name not in self._procs and not self.registry.alive(name, pid, start):
                log.info("not stopping worker %s: pid %d is not that worker (any more)", name, pid)
                continue  # a reused pid: not ours to signal
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGCONT)  # a stopped (frozen) worker handles it too
            self._stopping.add(name)

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.instances():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._wait_any(min(0.05, remaining))
        return True

    def wait_for_an_exit(self, seconds: float) -> bool:
        self._wait_any(seconds)
        return True

    def _wait_any(self, timeout: float) -> None:
        """Until one of the run's workers exits (a pidfd each: those this fleet started and
        those the registry lists, as another fleet of the run started them), or ``timeout``."""
        fds = []
        pids = {proc.pid for proc in self._procs.values()}
        pids |= {pid for pid, _ in self.registry.entries().values()}
        try:
            for pid in pids:
                with contextlib.suppress(OSError):  # gone already, or no pidfd on this system
                    fds.append(os.pidfd_open(pid))
            if fds:
                select.select(fds, [], [], timeout)
            else:
                time.sleep(timeout)
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        if self._queue is not None:
            self._queue.close()
            self._queue = None

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send a signal to one worker (tests and demos of preemption)."""
        pid, start = self.registry.entries().get(name, (None, None))
        if pid is not None and (name in self._procs or self.registry.alive(name, pid, start)):
            os.kill(pid, sig)
