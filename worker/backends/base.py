"""What a worker's backend opens: its queue, store and event bus, and the ledger over them."""

from __future__ import annotations

from worker.ledger import Ledger
from worker.queue import EventBus, WorkQueue
from worker.store import Store


class Backends:
    """A backend's queue, store and event bus, and the ledger that claims and settles attempts
    through them (by default one call at a time: :class:`worker.ledger.Ledger`)."""

    def __init__(
        self,
        queue: WorkQueue,
        store: Store,
        events: EventBus,
        ledger: Ledger | None = None,
    ):
        self.queue = queue
        self.store = store
        self.events = events
        self.ledger: Ledger = (
            ledger if ledger is not None else Ledger(queue=queue, store=store, events=events)
        )

    def close(self) -> None:
        """Close the queue's, the event bus's and the store's connections."""
        self.queue.close()
        self.events.close()
        self.store.close()
