"""Open the queue, store and event bus of a backend from plain settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.backends.local.queue import LocalEvents, LocalQueue
from worker.backends.local.store import QUEUE_FILE, LocalStore
from worker.clock import SYSTEM_CLOCK, Clock
from worker.queue import EventBus, WorkQueue
from worker.store import Store

__all__ = ["QUEUE_FILE", "Backends", "local_run_events", "open_local"]


@dataclass
class Backends:
    queue: WorkQueue
    store: Store
    events: EventBus

    def close(self) -> None:
        self.queue.close()
        self.events.close()


def open_local(root: Path, *, clock: Clock = SYSTEM_CLOCK, **queue_options: float) -> Backends:
    """The embedded backend rooted at ``root`` (the store tree plus ``queue.db``)."""
    store = LocalStore(root)
    queue = LocalQueue(root / QUEUE_FILE, clock=clock, **queue_options)  # type: ignore[arg-type]
    events = LocalEvents(root / QUEUE_FILE, clock=clock)
    return Backends(queue=queue, store=store, events=events)


def local_run_events(
    root: Path, run_id: str, *, since: float | None = None, clock: Clock = SYSTEM_CLOCK
) -> EventBus:
    """A runner's view of one run's events in the embedded backend (see :class:`LocalEvents`)."""
    return LocalEvents(root / QUEUE_FILE, clock=clock, run_id=run_id, since=since)
