"""A streaming pull into a buffer: how the runner takes events and dead letters.

The runner is the only consumer of those subscriptions, and the stream avoids polling two
subscriptions several times a second.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any

import google.cloud.pubsub_v1 as pubsub_v1
from google.api_core import exceptions as gexc
from google.cloud.pubsub_v1.subscriber.message import Message

from worker.backends.gcp.pubsub_api import ACK_IDS_PER_CALL, not_found_or_denied
from worker.backends.gcp.retry import PUBSUB, PUBSUB_RETRY, Kind

log = logging.getLogger("cflow.pubsub")

INBOX_MAX_MESSAGES = 10_000  # events or dead letters the runner holds before taking them


class Inbox:
    """A streaming pull into a buffer; :meth:`take` hands out (and acks) what has arrived.

    The stream starts on the first :meth:`take`, so commands that never read open none.
    """

    def __init__(
        self,
        subscriber: pubsub_v1.SubscriberClient,
        subscription: str,
        *,
        max_messages: int = INBOX_MAX_MESSAGES,
    ):
        self.subscriber = subscriber
        self.subscription = subscription
        self.max_messages = max_messages
        self._buffer: deque[Message] = deque()
        self._cond = threading.Condition()
        self._future: Future[Any] | None = None

    def _on_message(self, message: Message) -> None:
        with self._cond:
            self._buffer.append(message)  # while closing too: close() returns them all
            self._cond.notify_all()

    def _start(self) -> None:
        if self._future is None:
            self._future = self.subscriber.subscribe(
                self.subscription,
                self._on_message,
                flow_control=pubsub_v1.types.FlowControl(max_messages=self.max_messages),
                await_callbacks_on_shutdown=True,
            )

    def take(self, max_items: int, timeout: float) -> list[Message]:
        """Up to ``max_items`` messages, waiting up to ``timeout`` seconds for the first."""
        with self._cond:
            self._start()
            assert self._future is not None
            if not self._buffer and timeout > 0:
                self._cond.wait(timeout)
            if not self._buffer and self._future.done():
                exc = self._future.exception()
                self._future = None  # the next take reopens the stream
                if exc is not None and PUBSUB.classify(exc).kind is Kind.PERMANENT:
                    raise not_found_or_denied(exc, f"subscription {self.subscription}")
                if exc is not None:  # a transient end of the stream: reopened next time
                    log.warning("the stream of %s ended (%s); reopening", self.subscription, exc)
            taken = [self._buffer.popleft() for _ in range(min(max_items, len(self._buffer)))]
        for message in taken:
            message.ack()
        return taken

    def close(self) -> None:
        """End the stream and give back what was not taken, for the next reader at once."""
        if self._future is not None:
            self._future.cancel()
            # Cancelled, or failed earlier: either way the stream is over.
            with contextlib.suppress(Exception):
                self._future.result(timeout=30)
            self._future = None
        with self._cond:
            left = [m.ack_id for m in self._buffer]
            self._buffer.clear()
        # Nacked only now, by a plain call: nacked while the stream was still open, they went
        # straight back to this closing stream and waited out their deadline.
        for start in range(0, len(left), ACK_IDS_PER_CALL):
            try:
                self.subscriber.modify_ack_deadline(
                    subscription=self.subscription,
                    ack_ids=left[start : start + ACK_IDS_PER_CALL],
                    ack_deadline_seconds=0,
                    retry=PUBSUB_RETRY,
                )
            except gexc.GoogleAPICallError as exc:
                log.warning("could not give back %d messages: %s", len(left), exc)
