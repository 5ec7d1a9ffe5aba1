"""The work queue and event bus as Pub/Sub gives them, in memory and on virtual time.

Why not :class:`worker.backends.local.queue.LocalQueue` on the simulated clock? It works (the
simulator's tests run a small fleet on it too), but the cloud backend is Pub/Sub and its semantics
differ where a fleet simulation feels them: a nacked or lapsed message comes back only after the
subscription's retry backoff (10 s doubling to 300 s, ``infra/messaging.py``), not at once; an
ack of a lease that lapsed and went to another worker is lost; delivery is at-least-once even
when every worker acks (a small duplicate rate); and the dead-letter topic is a separate queue.
It is also about 50x cheaper per operation than a SQLite transaction, which a 100,000-shard run
needs. Ordering is oldest-available first, as Pub/Sub does in practice (it promises none).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from runner.sim.clock import SimClock
from worker.protocol import Event, WorkMessage
from worker.queue import Delivery, EventBus, WorkQueue

WORK_ACK_DEADLINE = 60.0  # seconds, as the work subscription sets it
RETRY_MIN_BACKOFF = 10.0  # seconds, the subscription's retry policy...
RETRY_MAX_BACKOFF = 300.0  # ...doubling to this
MAX_DELIVERY_ATTEMPTS = 20  # the dead-letter policy's default in infra/variables.py
EVENT_LATENCY = 0.2  # seconds from a worker's publish to the runner's pull


@dataclass
class _Message:
    body: WorkMessage
    deliveries: int = 0
    retries: int = 0  # nacks and lapsed leases so far: the retry policy backs off on these
    lease: int | None = None  # token of the current lease
    deadline: float = 0.0  # when the current lease lapses
    ready_seq: int = -1  # the live entry of this message in the ready heap


class SimPubSub(WorkQueue):
    """One subscription's worth of messages with leases, retry backoff and a dead-letter queue."""

    def __init__(
        self,
        clock: SimClock,
        *,
        ack_deadline: float = WORK_ACK_DEADLINE,
        min_backoff: float = RETRY_MIN_BACKOFF,
        max_backoff: float = RETRY_MAX_BACKOFF,
        max_deliveries: int = MAX_DELIVERY_ATTEMPTS,
        duplicate_rate: float = 0.0,
        rng: random.Random | None = None,
    ):
        self.clock = clock
        self.ack_deadline = ack_deadline
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.max_deliveries = max_deliveries
        self.duplicate_rate = duplicate_rate
        self._rng = rng or random.Random(0)
        self._messages: dict[int, _Message] = {}
        self._ready: list[tuple[float, int, int]] = []  # (available at, seq, message id)
        self._leases: list[tuple[float, int, int]] = []  # (deadline, token, message id)
        self._dead: deque[WorkMessage] = deque()
        self._ids = itertools.count()
        self._seq = itertools.count()
        self.leased = 0
        self.counts = {k: 0 for k in ("published", "delivered", "acked", "nacked", "lapsed")}
        self.counts |= {"dead_lettered": 0, "lost_acks": 0, "stale_acks": 0}
        self.drained_at: float | None = 0.0  # when nothing was last left to deliver

    # -- bookkeeping -------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Messages not leased: waiting, or backing off before redelivery."""
        return len(self._messages) - self.leased

    def _offer(self, mid: int, at: float) -> None:
        seq = next(self._seq)
        self._messages[mid].ready_seq = seq
        heapq.heappush(self._ready, (at, seq, mid))
        self.drained_at = None

    def _release(self, msg: _Message, mid: int) -> None:
        """The lease ends without an ack: offer the message again after the retry backoff."""
        msg.lease = None
        self.leased -= 1
        msg.retries += 1
        backoff = min(self.max_backoff, self.min_backoff * 2 ** (msg.retries - 1))
        self._offer(mid, self.clock.now + backoff)

    def _expire(self, now: float) -> None:
        while self._leases and self._leases[0][0] <= now:
            _, token, mid = heapq.heappop(self._leases)
            msg = self._messages.get(mid)
            if msg is not None and msg.lease == token and msg.deadline <= now:
                self.counts["lapsed"] += 1
                self._release(msg, mid)

    def _note_drained(self) -> None:
        if self.drained_at is None and not self.backlog:
            self.drained_at = self.clock.now

    # -- WorkQueue ---------------------------------------------------------------------------

    def publish(self, messages: Iterable[WorkMessage], *, delay: float = 0.0) -> int:
        count = 0
        for body in messages:
            mid = next(self._ids)
            self._messages[mid] = _Message(body)
            self._offer(mid, self.clock.now + delay)
            count += 1
        self.counts["published"] += count
        return count

    def receive(
        self, max_messages: int, timeout: float, *, worker: str | None = None
    ) -> list[Delivery]:
        now = self.clock.now
        self._expire(now)
        out: list[Delivery] = []
        while self._ready and self._ready[0][0] <= now and len(out) < max_messages:
            _, seq, mid = heapq.heappop(self._ready)
            msg = self._messages.get(mid)
            if msg is None or msg.ready_seq != seq or msg.lease is not None:
                continue  # acked meanwhile, or a stale entry
            if msg.deliveries >= self.max_deliveries:
                self._dead.append(msg.body)
                self.counts["dead_lettered"] += 1
                del self._messages[mid]
                continue
            msg.deliveries += 1
            msg.lease = token = next(self._seq)
            msg.deadline = now + self.ack_deadline
            self.leased += 1
            heapq.heappush(self._leases, (msg.deadline, token, mid))
            out.append(Delivery(msg.body, msg.deliveries, (mid, token)))
        self.counts["delivered"] += len(out)
        self._note_drained()
        return out

    def ack(self, delivery: Delivery) -> None:
        mid, token = delivery.handle
        self._expire(self.clock.now)
        msg = self._messages.get(mid)
        if msg is None:
            return
        if msg.lease is not None and msg.lease != token:
            self.counts["stale_acks"] += 1  # the lease lapsed and another worker holds it
            return
        if self.duplicate_rate and self._rng.random() < self.duplicate_rate:
            self.counts["lost_acks"] += 1  # at-least-once: this one comes back after its deadline
            return
        if msg.lease is not None:
            self.leased -= 1
        self.counts["acked"] += 1
        del self._messages[mid]
        self._note_drained()

    def nack(self, delivery: Delivery, *, delay: float = 0.0) -> None:
        mid, token = delivery.handle
        self._expire(self.clock.now)
        msg = self._messages.get(mid)
        if msg is not None and msg.lease == token:
            self.counts["nacked"] += 1
            self._release(msg, mid)

    def requeue(self, delivery: Delivery, message: WorkMessage, *, front: bool = False) -> None:
        """As on Pub/Sub: publish the replacement, then ack (a preemption gives its shard back
        with a fresh delivery count). Counted as a nack: the shard goes back at once."""
        self.counts["nacked"] += 1
        self.publish([message])
        self.ack(delivery)

    def extend(self, delivery: Delivery, seconds: float) -> None:
        mid, token = delivery.handle
        now = self.clock.now
        self._expire(now)
        msg = self._messages.get(mid)
        if msg is not None and msg.lease == token:
            msg.deadline = now + seconds
            heapq.heappush(self._leases, (msg.deadline, token, mid))

    def dead_letters(self, max_messages: int = 100) -> list[WorkMessage]:
        out: list[WorkMessage] = []
        while self._dead and len(out) < max_messages:
            out.append(self._dead.popleft())
        return out


class SimEvents(EventBus):
    """Events reach the runner ``latency`` seconds after a worker publishes them."""

    def __init__(self, clock: SimClock, *, latency: float = EVENT_LATENCY):
        self.clock = clock
        self.latency = latency
        self._queue: deque[tuple[float, Event]] = deque()
        self.published = 0

    def publish(self, event: Event) -> None:
        self._queue.append((self.clock.now + self.latency, event))
        self.published += 1

    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        now = self.clock.now
        out: list[Event] = []
        while self._queue and self._queue[0][0] <= now and len(out) < max_events:
            out.append(self._queue.popleft()[1])
        return out
