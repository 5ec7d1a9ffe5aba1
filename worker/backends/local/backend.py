"""Open the embedded backend: a store tree plus its SQLite file, ``queue.db``."""

from __future__ import annotations

from pathlib import Path

from worker.backends.base import Backends
from worker.backends.local.events import LocalEvents
from worker.backends.local.ledger import LocalLedger
from worker.backends.local.queue import LocalQueue
from worker.backends.local.store import QUEUE_FILE, LocalStore
from worker.clock import SYSTEM_CLOCK, Clock
from worker.queue import EventBus


def open_local(
    root: Path, *, clock: Clock = SYSTEM_CLOCK, run_id: str | None = None, **queue_options: float
) -> Backends:
    """The embedded backend rooted at ``root`` (the store tree plus ``queue.db``); ``run_id``:
    its queue receives that run's messages only (a worker started for one run).

    Its queue, events and the store's records share one SQLite file, so its ledger settles a
    batch of attempts in one durable transaction (:class:`LocalLedger`).
    """
    store = LocalStore(root)
    queue = LocalQueue(
        root / QUEUE_FILE,
        clock=clock,
        run_id=run_id,
        **queue_options,  # type: ignore[arg-type]
    )
    # The events share the queue's connections (one per thread): neither opens a transaction
    # inside the other's, and a connection less is a file open and two pragmas less.
    events = LocalEvents(root / QUEUE_FILE, clock=clock, db=queue.db)
    ledger = LocalLedger(queue=queue, store=store, events=events, clock=clock)
    return Backends(queue=queue, store=store, events=events, ledger=ledger)


def local_run_events(
    root: Path, run_id: str, *, since: float | None = None, clock: Clock = SYSTEM_CLOCK
) -> EventBus:
    """A runner's view of one run's events in the embedded backend (see :class:`LocalEvents`)."""
    return LocalEvents(root / QUEUE_FILE, clock=clock, run_id=run_id, since=since)
