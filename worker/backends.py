"""Open the queue, store and event bus of a backend from plain settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worker.clock import SYSTEM_CLOCK, Clock
from worker.local_queue import LocalEvents, LocalQueue
from worker.local_store import LocalStore
from worker.queue import EventBus, WorkQueue
from worker.store import Store

QUEUE_FILE = "queue.db"


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
