"""The thread that publishes and watches a run for :class:`cflow.Run`, as ``runner submit``
and ``runner watch`` do in theirs, and what the caller's thread reads from it."""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable

from runner.backends.factory import open_deployment
from runner.config import Config
from runner.engine import runs
from runner.engine.watch import Snapshot, Watcher
from runner.finish import Outcome, resume_watching, watch_and_finish
from worker.agent.halt_rule import DEFAULT_HALT, HaltRule
from worker.protocol import Manifest, RunState

HOLD_SECONDS = 1.0  # how long a run's end waits for the caller's thread to read its values
_live: set[Driver] = set()  # the threads of this process still watching a run
_live_lock = threading.Lock()
_exit_registered = False


def let_go(timeout: float = 60.0) -> bool:
    """Wait until every run this process watches has let its workers go (a run's end is known
    before its last workers have stopped); True when none is left."""
    with _live_lock:
        drivers = list(_live)
    deadline = time.monotonic() + timeout
    return all(d.join(max(0.0, deadline - time.monotonic())) for d in drivers)


def _at_exit() -> None:
    """This process exits: each run it still watches is left to its ``at_exit``."""
    with _live_lock:
        drivers = list(_live)
    for driver in drivers:
        if driver.at_exit is not None and not driver.over.is_set():
            driver.at_exit()


class Driver:
    """The thread that publishes and watches the run to its end, as ``runner submit`` does."""

    def __init__(self) -> None:
        # The run exists and its first shards are out (or the thread ended): the caller's
        # thread, waiting on it, wakes once the run's first publish no longer needs the GIL.
        self.created = threading.Event()
        self.done = threading.Event()  # the thread ended (its workers let go)
        self.over = threading.Event()  # the run's end is known (its last workers may be going)
        # Every shard committed, none failed, as the watcher saw them: the values can be read
        # while the run is being finished (set at the end too, so a wait on it never hangs).
        self.all_done = threading.Event()
        # The caller's thread reads the values as soon as every shard is committed (``reading``):
        # the run is then finished and its workers let go only once it has them (``taken``), or
        # after HOLD_SECONDS, so that its read has the process and the cores to itself.
        self.reading = threading.Event()
        self.taken = threading.Event()
        self.run_id: str | None = None
        self.error: BaseException | None = None
        self.outcome: Outcome | None = None
        self.snapshot: Snapshot | None = None
        self.settled: set[str] = set()  # shard ids committed or failed, as the watcher saw them
        self.committed: frozenset[str] = frozenset()  # of those, the ones committed
        # Set whenever the watcher saw more shards settle, and at the run's end: the caller's
        # thread reads each committed chunk's values while the others run (Run.results).
        self.changed = threading.Event()
        self.stop = threading.Event()  # cancel: the watch is interrupted, the run cancelled
        # What this process's exit does while the run goes on (a cflow.Run's at_exit): the
        # thread is a daemon, and would end with the process mid-watch
        self.at_exit: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    def start(self, body: Callable[[Driver], Outcome | None]) -> None:
        def target() -> None:
            try:
                with _live_lock:
                    _live.add(self)
                self.outcome = body(self)
            except BaseException as exc:  # handed to the caller's thread
                self.error = exc
            finally:
                self.created.set()
                self.all_done.set()
                self.over.set()
                self.changed.set()
                with _live_lock:
                    _live.discard(self)
                self.at_exit = None  # its Run, no longer kept by it: closed once dropped
                self.done.set()

        global _exit_registered
        if not _exit_registered:  # after the kept launcher's (atexit runs the last one first)
            atexit.register(_at_exit)
            _exit_registered = True
        self._thread = threading.Thread(target=target, name="cflow-run", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait until the thread has ended, not only said so (``done``): a run made right
        after sees this process with one thread again, so its workers can be forked."""
        if not self.done.wait(timeout):
            return False
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def on_outcome(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.over.set()
        self.changed.set()

    def on_created(self, manifest: Manifest) -> None:
        self.run_id = manifest.run_id  # a Ctrl-C from now on cancels the run

    def on_published(self, count: int) -> None:
        self.created.set()

    def display(self, watcher: Watcher, poll_seconds: float) -> Snapshot:
        """Watch to the end, keeping what the caller's thread reads; a cancel interrupts it."""

        def update(snapshot: Snapshot) -> None:
            self.snapshot = snapshot
            view = watcher.view
            self.settled = view.succeeded | view.failed
            if len(view.succeeded) != len(self.committed):
                self.committed = frozenset(view.succeeded)
                self.changed.set()
            if snapshot.finished and not snapshot.failed and not snapshot.cancelled:
                self.all_done.set()
                self.changed.set()
            if self.stop.is_set():
                raise KeyboardInterrupt

        snapshot = watcher.watch(on_update=update, poll_seconds=poll_seconds)
        if self.all_done.is_set() and self.reading.is_set():
            self.taken.wait(HOLD_SECONDS)
        return snapshot


def attach_driver(run_id: str, config: Config) -> Driver:
    """Watch a run made elsewhere to its end, as ``runner watch`` does; Ctrl-C cancels it
    (the caller's thread decides)."""
    driver = Driver()
    driver.run_id = run_id

    def body(d: Driver) -> Outcome | None:
        dep = open_deployment(config)
        try:
            manifest = runs.load_manifest(dep.backends.store, run_id)
            if manifest.state != RunState.ACTIVE.value:
                return None
            rule = HaltRule.parse(manifest.options.get("halt") or DEFAULT_HALT)
            watcher = resume_watching(dep, manifest)
            return watch_and_finish(
                watcher,
                dep,
                rule=rule,
                cancel_on_interrupt=True,
                out=None,
                display=d.display,
                on_outcome=d.on_outcome,
            )
        finally:
            dep.close()

    driver.start(body)
    return driver
