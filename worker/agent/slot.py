"""One slot's state, the claims it holds, and the agent's stop flag."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from worker.ledger import Finished
from worker.protocol import Manifest
from worker.queue import Delivery

FAST_SHARD = 0.025  # seconds: shards shorter than this are received several at a time
MAX_PREFETCH = 32  # most messages one slot holds at once


@dataclass(frozen=True)
class Claim:
    """An attempt this worker has claimed and announced, not yet finished."""

    delivery: Delivery
    manifest: Manifest
    attempt: int
    started: float
    bundle: str


class StopFlag:
    """A stop flag a signal handler may set: no lock, unlike threading.Event (whose handler,
    interrupting itself, would wait forever for its own lock)."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        """Ask everything that watches the flag to stop."""
        self._set = True

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self._set


class Slot:
    """One slot's state: the messages it holds and the attempts waiting to be settled."""

    def __init__(self, index: int, scratch: Path):
        self.index = index
        self.ready = False
        self.scratch = scratch / f"slot-{index}"
        self.held: list[Delivery] = []  # received, not yet settled (extended while held)
        self.unstarted: list[Claim] = []  # claimed with the rest of a batch, not yet run
        self.pending: list[Finished] = []
        self.pending_since = 0.0
        self.prefetch = 1
        self.failed = False  # an attempt of the current batch failed
        self.idle = False

    def adapt(self, durations: list[float], got: int) -> None:
        """Receive more at once while shards are short, succeed and the queue keeps up; one
        while they are long or failing."""
        if self.failed:
            self.prefetch, self.failed = 1, False
        elif durations and max(durations) < FAST_SHARD and got >= self.prefetch:
            self.prefetch = min(self.prefetch * 2, MAX_PREFETCH)
        elif not durations or max(durations) >= 10 * FAST_SHARD:
            self.prefetch = 1

    def release(self, delivery: Delivery) -> None:
        """Stop holding a message (settled, dropped or given back)."""
        with contextlib.suppress(ValueError):
            self.held.remove(delivery)
