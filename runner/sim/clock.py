"""Virtual time: an event heap, and a :class:`worker.clock.Clock` whose ``sleep`` runs it.

The runner's own watch loop drives a simulation: :meth:`runner.engine.watch.Watcher.watch` polls,
then calls ``clock.sleep(poll_seconds)``, and that sleep runs every simulated event (VMs booting,
workers pulling, tasks ending, preemptions) due before the loop wakes again. Whatever CPU is spent
outside ``sleep`` is therefore the runner's own, which is how the simulator measures it.
"""

from __future__ import annotations

import heapq
import itertools
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field

Action = Callable[[], None]

EPOCH = 1_700_000_000.0  # virtual t=0, so timestamps written to the store look like real ones


class SimTimeout(Exception):
    """The simulated run did not end before the horizon (a lost shard or a stuck fleet)."""


@dataclass
class RunnerMeter:
    """CPU seconds and traced memory of the runner between two sleeps (one poll each).

    Every ``trace_every``-th poll runs under :mod:`tracemalloc` (which slows it down), so its
    peak memory is known; the others give the CPU time.
    """

    trace_every: int = 0  # 0: never trace
    cpu: list[float] = field(default_factory=list)  # seconds, untraced polls
    cpu_at: list[float] = field(default_factory=list)  # virtual time of each untraced poll
    peak_bytes: list[int] = field(default_factory=list)  # traced polls
    peak_at: list[float] = field(default_factory=list)
    polls: int = 0
    _mark: float | None = None
    _tracing: bool = False

    def runner_resumes(self) -> None:
        self._tracing = bool(self.trace_every) and self.polls % self.trace_every == 0
        if self._tracing:
            tracemalloc.start()
        self._mark = time.process_time()

    def runner_pauses(self, now: float) -> None:
        if self._mark is None:
            return
        spent = time.process_time() - self._mark
        self.polls += 1
        self._mark = None
        if self._tracing:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            self.peak_bytes.append(peak)
            self.peak_at.append(now)
        else:
            self.cpu.append(spent)
            self.cpu_at.append(now)


class SimClock:
    """A clock that only moves when the simulation runs; ``sleep`` runs the events it skips."""

    def __init__(self, *, horizon: float = float("inf"), meter: RunnerMeter | None = None):
        self._now = 0.0
        self._heap: list[tuple[float, int, Action]] = []
        self._seq = itertools.count()
        self.horizon = horizon  # virtual seconds after which a sleep raises SimTimeout
        self.meter = meter
        self.events_run = 0

    # -- the Clock protocol ------------------------------------------------------------------

    def time(self) -> float:
        return EPOCH + self._now

    def monotonic(self) -> float:
        return self._now

    def sleep(self, seconds: float) -> None:
        if self.meter is not None:
            self.meter.runner_pauses(self._now)
        self.run_until(self._now + max(seconds, 0.0))
        if self.meter is not None:
            self.meter.runner_resumes()

    # -- the event heap ----------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Virtual seconds since the simulation started."""
        return self._now

    def at(self, when: float, action: Action) -> None:
        """Run ``action`` at virtual time ``when`` (now, if that has passed)."""
        heapq.heappush(self._heap, (max(when, self._now), next(self._seq), action))

    def after(self, delay: float, action: Action) -> None:
        self.at(self._now + delay, action)

    def run_until(self, until: float) -> None:
        """Run every event due at or before ``until``, in time order, then stand at ``until``."""
        heap = self._heap
        while heap and heap[0][0] <= until:
            when, _, action = heapq.heappop(heap)
            self._now = when
            action()
            self.events_run += 1
        self._now = max(self._now, until)
        if self._now > self.horizon:
            raise SimTimeout(f"simulation passed its horizon of {self.horizon:.0f} s")

    def run_while(self, condition: Callable[[], bool], step: float) -> None:
        """Run events in ``step``-second strides while ``condition`` holds."""
        while condition():
            self.run_until(self._now + step)
