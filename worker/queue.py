"""The work queue and the event bus: the interfaces every backend implements.

Vocabulary (see :mod:`worker.protocol`): the queue holds one message per shard; a worker
**receives** a message, which **leases** it (no other worker gets it while the lease lives), then
**acks** it after the shard is committed or finally failed, or **nacks** it (preemption) so it is
delivered again at once. A lease is **extended** while the task runs. A message delivered more than
the queue's maximum times is **dead-lettered**: the safety net for messages that kill the worker
itself. Task failures are not counted by the queue but by the message (``WorkMessage.failures``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from worker.protocol import Event, WorkMessage


@dataclass
class Delivery:
    """One received message, leased to the receiver until acked, nacked or the lease lapses."""

    message: WorkMessage
    delivery_attempt: int  # 1 on first delivery
    handle: Any  # the backend's own token for ack/nack/extend


@dataclass(frozen=True)
class QueueStats:
    """Counts a backend can give cheaply; ``None`` where it cannot (Pub/Sub)."""

    queued: int | None
    leased: int | None
    dead: int | None


class WorkQueue(ABC):
    """At-least-once delivery of shard messages to workers."""

    # A receive that finds nothing may be held by the server for seconds (Pub/Sub's pull),
    # while one that finds a message is answered at once.
    holds_empty_receives: bool = False

    @abstractmethod
    def publish(self, messages: Iterable[WorkMessage], *, delay: float = 0.0) -> int:
        """Enqueue messages (batched by the backend); returns how many. ``delay`` is a hint."""

    @abstractmethod
    def receive(
        self, max_messages: int, timeout: float, *, worker: str | None = None
    ) -> list[Delivery]:
        """Lease up to ``max_messages``, waiting up to ``timeout`` seconds for the first.

        ``worker`` names the lease holder where the backend records it (:meth:`leases`)."""

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """The receiver is stopping: a receive waiting for messages returns with what it has at
        its next look, and every later one at once (a no-op where receives wait no longer than
        the caller's own pace anyway). Safe in a signal handler: it takes no lock."""

    @abstractmethod
    def ack(self, delivery: Delivery) -> None:
        """The message is done with: never deliver it again."""

    @abstractmethod
    def nack(self, delivery: Delivery, *, delay: float = 0.0) -> None:
        """Give the message back for redelivery, at once or after ``delay`` seconds."""

    @abstractmethod
    def extend(self, delivery: Delivery, seconds: float) -> None:
        """Keep the lease alive for ``seconds`` more (a no-op where the client does it itself)."""

    def requeue(self, delivery: Delivery, message: WorkMessage, *, front: bool = False) -> None:
        """Replace a leased message with ``message``, whose delivery count starts over.

        How a preemption gives its shard back without the queue counting it as a delivery
        (the message counts preemptions itself). ``front``: ahead of everything queued, where
        the backend can. The default publishes before acking, so a crash in between duplicates
        the shard (harmless: first commit wins) instead of losing it.
        """
        self.publish([message])
        self.ack(delivery)

    def release(self, worker: str) -> int:
        """Make every lease ``worker`` holds available now (it is known dead); how many.

        Only where the backend records lease holders; elsewhere the leases lapse by themselves.
        """
        return 0

    def leases(self, run_id: str) -> dict[str, str] | None:
        """Live leases of a run's messages: shard id -> worker; None where unknown (Pub/Sub)."""
        return None

    def pending(self, run_id: str) -> set[str] | None:
        """Shard ids of a run that have a message (queued, leased or in backoff); None where
        the backend cannot tell (Pub/Sub). Outstanding shards not in it are lost."""
        return None

    @abstractmethod
    def dead_letters(self, max_messages: int = 100) -> list[WorkMessage]:
        """Take dead-lettered messages off the dead-letter queue (the runner reports them)."""

    def purge(self, run_id: str) -> int:
        """Drop a run's messages that are not leased, where the backend can; returns how many."""
        return 0

    def stats(self, run_id: str | None = None) -> QueueStats:
        return QueueStats(queued=None, leased=None, dead=None)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background threads."""


class Doorbell(Protocol):
    def wait(self, seconds: float) -> bool:
        """Until it rings or ``seconds`` pass; True when it rang."""
        ...

    def close(self) -> None:
        """Stop listening: it is rung no more."""
        ...


class EventBus(ABC):
    """Worker-to-runner progress events. Lossy by contract: the store stays the truth.

    Workers publish; a runner watching one run pulls through a bus opened for that run
    (``Deployment.run_events``), which sees that run's events and the worker-level ones that
    carry no run (idle, stopped), and never takes another run's events.
    """

    @abstractmethod
    def publish(self, event: Event) -> None: ...

    @abstractmethod
    def pull(self, max_events: int = 1000, timeout: float = 0.0) -> list[Event]:
        """Take events, waiting up to ``timeout`` for the first."""

    def doorbell(self) -> Doorbell | None:
        """What a runner may wait on between looks, rung when this bus's run may be over
        (locally: :mod:`worker.backends.local.bell`), for it to close when it stops watching;
        None where there is none."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and background threads."""
