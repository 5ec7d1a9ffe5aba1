"""How often the watch loop looks: at its pace while workers speak, slower while none does
(locally, where a look is cheap and a short run's end should be seen at once), quicker once
every shard left is running, and the drain's own pace after the run. A pause ends early where
the workers ring a doorbell when the run may be over (locally)."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.clock import Clock
from worker.queue import Doorbell

# Where the loop slows down while nothing is heard, the share of its pace it looks at once
# every shard left is running: a short run's end is seen a few ms after its last commit, not
# up to a whole pace later (bench/python_api.py).
NEAR_END_PACE = 0.25
# Seconds between looks at the fleet while it drains after a run: the loop's pace, but at
# least the first and at most the second (the drain is short, and a quick look at a worker
# that just said it is idle ends the run sooner).
DRAIN_PACE = (0.05, 0.5)
SLOWER = 1.5  # the pace grows this much at each look that hears nothing


@dataclass
class Pace:
    poll_seconds: float  # the loop's pace
    quiet_poll_seconds: float | None = None  # the slowest while nothing is heard (None: fixed)
    near: bool = False  # every shard left is running, as of the last look
    bell: Doorbell | None = None  # rung when the run may be over (None: none)
    _now: float = field(init=False)

    def __post_init__(self) -> None:
        self._now = self.poll_seconds

    def next(self, *, heard: bool, near: bool) -> float:
        """Seconds until the next look, after a look that ``heard`` workers speak or not, with
        no shard queued (``near``) or some."""
        was_near, self.near = self.near, near
        if self.quiet_poll_seconds is None:
            return self._now
        if heard or (near and not was_near):
            self._now = self.poll_seconds * (NEAR_END_PACE if near else 1.0)
        else:
            self._now = min(self._now * SLOWER, self.quiet_poll_seconds)
        return self._now

    def pause(self, clock: Clock, *, heard: bool, near: bool) -> None:
        """Wait until the next look (:meth:`next`), or until the bell rings."""
        seconds = self.next(heard=heard, near=near)
        if self.bell is not None:
            self.bell.wait(seconds)
        else:
            clock.sleep(seconds)

    def close(self) -> None:
        """The watch is over: its bell goes."""
        if self.bell is not None:
            self.bell.close()
            self.bell = None

    @property
    def drain(self) -> float:
        return min(max(self.poll_seconds, DRAIN_PACE[0]), DRAIN_PACE[1])
