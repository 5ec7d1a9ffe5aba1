"""When a worker says it is idle: once every slot is, and again every heartbeat while all stay
so; on a queue that holds an empty receive (Pub/Sub), as soon as a receive has waited a moment
with nothing. The runner lets an idle worker go (scale-down, the end of a run)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from worker.agent.slot import Slot
from worker.clock import Clock

# Seconds a held receive waits with nothing before the worker says it is idle (a server that
# has a message answers in milliseconds; Pub/Sub holds an empty pull for seconds).
IDLE_WORD_AFTER = 0.5


class IdleWords:
    """A worker's word that it is idle, and whether its slots are; ``lock`` guards both (and
    whatever the agent decides with them)."""

    def __init__(self, clock: Clock, heartbeat: float, emit: Callable[[], None], holds_empty: bool):
        self.lock = threading.Lock()
        self.slots: list[Slot] = []
        self._clock = clock
        self._heartbeat = heartbeat
        self._emit = emit
        self._holds_empty = holds_empty  # its queue holds an empty receive (Pub/Sub)
        self._announced = False
        self._settled = False  # its first look with every slot idle since it worked is done
        self._said = 0.0  # when it last said it is idle (monotonic)

    def active(self, slot: Slot) -> None:
        """``slot`` received work: the worker is no longer idle."""
        with self.lock:
            slot.idle = False
            self._announced = self._settled = False

    def while_held(self, slot: Slot) -> threading.Timer | None:
        """On a queue that holds an empty receive, say this worker is idle once the receive
        has waited ``IDLE_WORD_AFTER`` with nothing, not only once it comes back empty seconds
        later: the run's runner lets it go that much sooner. A message that comes after all is
        started and said, as one that comes right after an idle word. Cancel it when the
        receive returns."""
        if not self._holds_empty:
            return None
        timer = threading.Timer(IDLE_WORD_AFTER, self.say, (slot,))
        timer.daemon = True
        timer.start()
        return timer

    def say(self, slot: Slot) -> None:
        """``slot`` found nothing: say idle once every slot has, and again every heartbeat
        while all stay so."""
        with self.lock:
            slot.idle = True
            if not self._all_idle():
                return
            now = self._clock.monotonic()
            # Said again every heartbeat: a runner that began listening since (a resumed watch,
            # a retry, another run's) hears within a heartbeat that this worker is free.
            if self._announced and now - self._said < self._heartbeat:
                return
            self._announced, self._said = True, now
        self._emit()

    def settled_now(self) -> bool | None:
        """Holding ``lock``: None while some slot works; else whether this is the first look
        with every slot idle since the worker worked."""
        if not self._all_idle():
            return None
        first, self._settled = not self._settled, True
        return first

    def _all_idle(self) -> bool:
        return all(s.idle for s in self.slots)
