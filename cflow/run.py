"""``cflow.Run``: one run of the engine seen from Python, started here or attached to."""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cflow.driver import Driver, attach_driver
from cflow.errors import ShardFailed
from cflow.progress import ProgressChoice, Ticker, in_notebook, pick
from cflow.reading import ValueReader
from cflow.results import (
    Progress,
    Results,
    Stored,
    completed,
    left_unsettled,
    run_values,
)
from cflow.shipping import ItemFeed
from cflow.tally import ItemTally, item_tally
from cflow.tally import progress as item_progress
from runner.backends.factory import open_deployment
from runner.config import Config
from runner.engine import runs
from runner.engine.cache import cached_count
from runner.engine.deployment import Deployment
from worker.errors import NotFound
from worker.protocol import Manifest, RunState, Shard

PACE = 0.2  # seconds between looks while waiting in the caller's thread (Ctrl-C is seen then)
EXIT_SECONDS = 30.0  # how long this process's exit waits for a run it waited for to let go
STOP_SECONDS = 10.0  # how long a cancel waits for the items' publisher to record its count


class Run:
    """A run of a function over items. Made by :func:`cflow.submit` or :func:`cflow.attach`;
    the same run as ``runner runs``, ``status``, ``watch``, ``cancel`` and ``report`` show.

    Attributes:
        id: the run id (``runner status ID``).
    """

    def __init__(
        self,
        run_id: str,
        config: Config,
        *,
        driver: Driver | None = None,
        feed: ItemFeed | None = None,
        detach: bool = False,
        progress: ProgressChoice = None,
    ):
        self.id = run_id
        self._show = progress  # how waiting shows progress (cflow.progress.pick)
        self._end_shown = False  # a wait showed the run's end: later ones show nothing
        self._config = config
        self._driver = self._owned(driver)
        self._feed = feed
        self._detach = detach
        self._dep: Deployment | None = None
        self._closing: weakref.finalize[Any, Any] | None = None
        self._shards: dict[str, Shard] | None = None
        self._chunked: bool | None = None  # whether its shards are chunks of items
        self._items: ItemTally | None = None

    def __repr__(self) -> str:
        return f"Run({self.id!r})"

    @property
    def _store(self) -> Any:
        return self._dep_open().backends.store

    def _manifest(self) -> Manifest:
        return runs.load_manifest(self._store, self.id)

    def progress(self) -> Progress:
        """How many items are done, failed, running and queued, as plain counts."""
        manifest = self._manifest()
        snap = self._driver.snapshot if self._driver is not None else None
        live = snap if snap is not None and not self._driver_done() else None
        store, tally = self._store, self._tally()
        if tally is not None:
            settled = set(self._driver.settled) if live is not None and self._driver else None
            return item_progress(tally, manifest, settled, live.running if live else 0)
        total = manifest.shard_count - (1 if manifest.publishing else 0)
        cancelled = manifest.state == RunState.CANCELLED.value
        if live is not None:
            return Progress(
                total, live.succeeded, live.failed, live.running, manifest.publishing, cancelled,
                live.cached, manifest.halted,
            )  # fmt: skip
        done = runs.committed(store, self.id)
        failed = runs.failed(store, self.id) - done
        return Progress(
            total, len(done), len(failed), 0, manifest.publishing, cancelled,
            cached_count(store, self.id), manifest.halted,
        )  # fmt: skip

    def _tally(self) -> ItemTally | None:
        """The item counts of a chunked run (None: one shard per item; the shards count)."""
        if self._items is None and self._chunked is not False:
            feed = self._feed
            if feed is not None and not feed.chunked:
                self._chunked = False
                return None
            self._items = item_tally(self._store, self.id, feed.spans if feed else None)
            self._chunked = self._items is not None
        return self._items

    def _ticker(self) -> Ticker:
        return Ticker(None if self._end_shown else pick(self._show, self.id), self.progress)

    def _driver_done(self) -> bool:
        return self._driver is None or self._driver.over.is_set()

    def cancel(self) -> None:
        """Cancel the run: no more items are read, running attempts stop, nothing more
        commits. Returns once the run is recorded cancelled and its workers let go. A run
        that is over already is left as it is."""
        if self._feed is not None:
            self._feed.stop(cancel=True)
        driver = self._driver
        if driver is not None and not driver.done.is_set():
            driver.taken.set()  # the values are not wanted now: the run's end waits for none
            # The publisher records its last count (within a batch's time of the stop) before
            # the run is recorded cancelled: the two never write the manifest at once.
            deadline = time.monotonic() + STOP_SECONDS
            while self._manifest().publishing and time.monotonic() < deadline:
                if driver.over.wait(PACE / 4):
                    break
            driver.stop.set()
            driver.done.wait()
        if self._manifest().state != RunState.ACTIVE.value:
            return  # cancelled by its watcher just now, or over already: nothing to stop
        dep = self._dep_open()
        runs.cancel(dep.backends.store, dep.backends.queue, self.id)

    def _dep_open(self) -> Deployment:
        if self._dep is None:
            self._dep = open_deployment(self._config)
            # Closed as soon as this Run goes, not when the collector next runs: an SQLite
            # connection is in a reference cycle (its statement cache), so a dropped Run's
            # left the store open until then (a forked worker then shares that state).
            self._closing = weakref.finalize(self, self._dep.close)
        return self._dep

    def wait(self) -> Progress:
        """Wait for the run's end (every item done or failed, or the run cancelled), watching
        it (scaling its workers, combining at the end) when nothing else here does.

        Ctrl-C cancels the run, or with ``detach=True`` stops reading the items and leaves the
        run going (it says how to attach). Returns the final counts.

        Raises:
            Exception: what the items' iterable raised part way (the items read before it
                ran; the run counts those).
        """
        self._wait()
        try:
            return self.progress()
        finally:
            self._close_here()

    def _wait(
        self,
        once_done: Callable[[], None] | None = None,
        meanwhile: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        """:meth:`wait` without counting the items at the end (:meth:`results` reads every
        chunk's record itself). ``once_done`` is called here as soon as every shard is seen
        committed, before the run's thread finishes the run (at most once; not at all where
        some failed, or the run was over already), and this thread then waits for that end;
        ``meanwhile`` is called with the shards seen committed each time more are, until
        then."""
        driver = self._watched()
        ticker = self._ticker()
        try:
            if once_done is not None and driver is not None:
                self._dep_open()  # the store opened while the run goes on, not after
                driver.reading.set()  # its end waits for the values to be read (Driver)
            while driver is not None and not driver.over.is_set():
                if once_done is not None and driver.all_done.is_set():
                    once_done()
                    once_done = None
                    driver.taken.set()
                    continue
                if meanwhile is not None and once_done is not None:
                    driver.changed.clear()  # a commit seen from now on wakes the wait below
                    meanwhile(driver.committed)
                    driver.changed.wait(PACE)
                else:
                    (driver.all_done if once_done is not None else driver.over).wait(PACE)
                ticker.tick()
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            if driver is not None:
                driver.taken.set()  # read, failed or interrupted: the run's end waits no more
            ticker.close()
        self._end_shown = True
        if driver is not None and driver.error is not None:
            raise driver.error
        feed = self._feed
        if feed is not None and feed.error is not None:  # the items read before it were run
            error, held = feed.error, feed.held(self._manifest().published or 0)
            note = f"cflow: run {self.id} holds the {held} items read before it"
            if note not in getattr(error, "__notes__", ()):
                error.add_note(note)
            raise error

    def _watched(self) -> Driver | None:
        """The thread watching the run here; one is started for a run nothing here watches
        (None: the run is over)."""
        driver = self._driver
        if driver is not None and driver.done.is_set() and driver.error is not None:
            raise driver.error
        if (driver is None or driver.over.is_set()) and not self._settled():
            self._driver = self._owned(attach_driver(self.id, self._config))
        return self._driver

    def _owned(self, driver: Driver | None) -> Driver | None:
        if driver is not None:
            driver.at_exit = self._at_exit  # the driver, live, keeps this Run until its end
        return driver

    def _at_exit(self) -> None:
        """This process exits while the run goes on here, never waited for (a script that
        submitted and ended): it is waited for, as ``concurrent.futures`` waits for its work,
        and Ctrl-C then cancels it. With ``detach=True``, or in a Jupyter kernel (restarted
        or shut down, it is killed if it takes long), it is left going, saying how to attach:
        with every item, read first (Ctrl-C stops reading them)."""
        if self._detach or in_notebook():
            self._leave_going(read_all=True)
            return
        print(f"cflow: waiting for run {self.id} to end (Ctrl-C cancels it)", file=sys.stderr)
        try:
            self.wait()
        except KeyboardInterrupt:
            return  # cancelled, and said so
        except Exception as exc:  # the items' iterable raised part way: said as results would
            print(f"cflow: run {self.id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        if self._driver is not None:
            self._driver.join(EXIT_SECONDS)  # its workers let go before this process ends

    def _unit(self) -> str:
        """What its shards are, for a line saying how many were done."""
        return "chunks of items" if self._tally() is not None else "items"

    def _settled(self) -> bool:
        manifest = self._manifest()
        return manifest.state != RunState.ACTIVE.value

    def _interrupted(self) -> None:
        if not self._detach:
            self.cancel()
            print(f"cflow: run {self.id} cancelled", file=sys.stderr)
            return
        self._leave_going()

    def _leave_going(self, *, read_all: bool = False) -> None:
        """Leave the run going with no one here watching it. Its items not read yet are read
        first with ``read_all`` (this process exits: a run left with part of a list it was
        given would be silently short), else no more are (Ctrl-C); either way the count of
        those it holds is recorded before this returns (a run left ``publishing`` could never
        be watched to its end), and said when reading was cut short."""
        cut = ""
        if self._feed is not None:
            cut = self._feed.leave(self.id, self._manifest, PACE, STOP_SECONDS, read_all=read_all)
        print(
            f"cflow: run {self.id} goes on{cut}; attach with cflow.attach({self.id!r}) or"
            f" `runner watch {self.id}`",
            file=sys.stderr,
        )
        if self._driver is not None:
            self._driver.at_exit = None  # left going: this process's exit has nothing to add

    def _index(self) -> dict[str, Shard]:
        if self._shards is None:
            self._shards = {s.id: s for s in runs.iter_shards(self._store, self.id)}
        return self._shards

    def results(self, return_exceptions: bool = False) -> Results:
        """Wait for the run, then its return values in input order (:class:`cflow.Results`:
        values over 1 MB are read from the store when their item is asked for).

        Raises:
            ShardFailed: an item failed (the first in input order), unless
                ``return_exceptions``, which puts each failure in its item's place.
            RunStateError: the run was cancelled before every item was done.
        """
        reader = ValueReader(
            self.id, lambda: self._store, self._shard, self._manifest, return_exceptions
        )

        def read_all() -> None:
            # Every shard committed: the values read, then this thread's store connections
            # closed, before the run's thread is let go to finish the run; closed after, each
            # blocking call of the close would hand that thread the turn, for up to the
            # interpreter's switch interval (5 ms) each.
            if reader.at_end():
                self._close_here()

        self._wait(read_all, reader.meanwhile)
        try:
            if isinstance(reader.values, Exception):
                raise reader.values
            if reader.values is not None:
                return reader.values
            return run_values(
                self._store,
                self._manifest(),
                return_exceptions,
                self._unit,
            )
        finally:
            self._close_here()

    def _close_here(self) -> None:
        """Close this thread's connections to the store once the values are read (a later
        look opens them again). Closed now, while the run's workers still have the file open,
        a close is cheap; left to the collector, a script's next map closes them before it
        forks, the last to the file folding its log in (milliseconds on that map's start)."""
        if self._dep is not None:  # the next look opens one afresh (closed clients stay so)
            dep, self._dep = self._dep, None
            if self._closing is not None:
                self._closing.detach()
            dep.close()

    def as_completed(self, return_exceptions: bool = False) -> Iterator[tuple[Any, Any]]:
        """``(item, value)`` as each item's shard commits; a failed item raises its
        :class:`cflow.ShardFailed` (which ends the loop), or with ``return_exceptions`` comes
        as ``(item, ShardFailed)`` and the loop goes on. Ctrl-C while waiting is handled as in
        :meth:`wait`."""
        store = self._store
        seen: set[str] = set()
        ticker = self._ticker()
        try:
            while True:
                ticker.tick()
                driver = self._watched()
                finished = driver is None or driver.over.is_set()
                settled = (
                    runs.committed(store, self.id) | runs.failed(store, self.id)
                    if finished or driver is None
                    else set(driver.settled)
                )
                for sid in sorted(settled - seen):
                    try:
                        pairs = completed(store, self.id, self._shard(sid))
                    except NotFound:  # stopped by a cancel, with no record: the end says so
                        continue
                    seen.add(sid)
                    for item, value in pairs:
                        if isinstance(value, ShardFailed) and not return_exceptions:
                            raise value
                        yield item, value
                if finished:
                    self._end_shown = True
                    if driver is not None and driver.error is not None:
                        raise driver.error
                    # Halted or cancelled: what never settled says so, as results() says it.
                    yield from left_unsettled(
                        store, self._manifest(), seen, return_exceptions, self._unit()
                    )
                    return
                assert driver is not None
                driver.over.wait(PACE)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        finally:
            ticker.close()

    def report(self, path: str | Path | None = None) -> Path | None:
        """A picture of the run, as ``runner report`` draws it: written to ``path``
        (``.html``, ``.png``, ``.pdf`` or ``.svg``) when given, and shown inline in a
        notebook; without a path a notebook only shows it (None), elsewhere it goes to
        ``<run>-report.html`` here. Returns the file written.

        Raises:
            ConfigError: ``path`` names no format the report writes, or matplotlib is missing.
        """
        from cflow.report import report

        return report(self._store, self.id, path)

    def _shard(self, sid: str) -> Shard:
        shard = self._index().get(sid)
        if shard is None:  # listed since: the stream's list grows as it is published
            self._shards = None
            shard = self._index()[sid]
        return shard


def _loaded(value: Any) -> Any:
    return value.load() if isinstance(value, Stored) else value
