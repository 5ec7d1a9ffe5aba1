"""The leaser of the Pub/Sub work queue: the messages a worker holds, kept leased.

A lease is the message's ack deadline. A background thread renews every held message's deadline
in one batched call per third of the lease, for at most ``max_lease_seconds`` after it arrived;
beyond that only the agent's extensions (:meth:`Leases.extend`) keep it. The renewing call
itself is the queue's (``modify``), so this module needs no Pub/Sub client.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from worker.clock import Clock

log = logging.getLogger("cflow.pubsub")


@dataclass
class Lease:
    """A received message: its ack id and how long it should be kept."""

    ack_id: str
    received: float  # clock.monotonic() at receipt
    wanted_until: float  # the agent's extend() horizon (monotonic)


class Leases:
    """The held messages of one queue, renewed by a leaser thread started with the first.

    Args:
        modify: sets the ack deadline of ack ids to a number of seconds (the queue's call).
        lease_seconds: the ack deadline the leaser keeps renewing.
        max_lease_seconds: how long the leaser renews a held message by itself.
        clock: the time source.
    """

    def __init__(
        self,
        modify: Callable[[list[str], int], None],
        *,
        lease_seconds: int,
        max_lease_seconds: float,
        clock: Clock,
    ):
        self._modify = modify
        self.lease_seconds = lease_seconds
        self.max_lease_seconds = max_lease_seconds
        self.clock = clock
        self.closed = threading.Event()
        self._lock = threading.Lock()
        self._held: dict[str, Lease] = {}
        self._leaser: threading.Thread | None = None

    def hold(self, ack_ids: Iterable[str]) -> list[Lease]:
        """Keep these messages leased from now on; starts the leaser the first time."""
        now = self.clock.monotonic()
        with self._lock:
            leases = [Lease(ack_id, now, now) for ack_id in ack_ids]
            for lease in leases:
                self._held[lease.ack_id] = lease
            if self._leaser is None:
                self._leaser = threading.Thread(target=self._renew, name="leaser", daemon=True)
                self._leaser.start()
        return leases

    def drop(self, lease: Lease) -> None:
        """Stop leasing the message (acked or given back)."""
        with self._lock:
            self._held.pop(lease.ack_id, None)

    def extend(self, lease: Lease, seconds: float) -> None:
        """Keep the message ``seconds`` more, even past ``max_lease_seconds``."""
        with self._lock:
            lease.wanted_until = max(lease.wanted_until, self.clock.monotonic() + seconds)

    def close(self) -> list[str]:
        """Stop the leaser; the ack ids of the messages still held, which no longer are."""
        self.closed.set()
        with self._lock:
            held = list(self._held)
            self._held.clear()
        return held

    def _renew(self) -> None:
        period = self.lease_seconds / 3
        while not self.closed.wait(period):
            now = self.clock.monotonic()
            with self._lock:
                ids = [
                    lease.ack_id
                    for lease in self._held.values()
                    if now - lease.received < self.max_lease_seconds or now < lease.wanted_until
                ]
            try:
                self._modify(ids, self.lease_seconds)
            except Exception:  # the next period tries again; a lapsed lease only redelivers
                log.warning("could not extend %d leases", len(ids), exc_info=True)
