"""What a runner heard of each worker of its fleet, and since when: the clock by which a worker
that says nothing is judged silent (frozen, or never started).

A worker that works says so at least every heartbeat, whatever its run, and one just booted says
it is idle: one silent past a lease and a heartbeat works for no run. The clock of a worker
never heard from starts when the fleet first lists it running (a VM still created or booting is
``starting``) or when this runner began hearing anyone, whichever is later: a resumed runner's
events may take seconds to reach it, and its own slow ears must not make a busy VM look frozen.
One never heard from at all is given a boot allowance besides (:meth:`mute`): its worker may
still be installing (a GPU VM waits minutes for its driver), but one frozen before its first
word must not count as a worker for ever.
"""

from __future__ import annotations

from collections.abc import Iterable

from runner.engine.fleet import Instance


class Hearing:
    """When each worker was last heard from, and since when each instance is listed running."""

    def __init__(self) -> None:
        self._heard: dict[str, float] = {}  # worker -> when it was last heard from
        self._listed: dict[str, float] = {}  # instance -> since when it is listed running
        self._found: set[str] | None = None  # running at the first look (None: none made yet)
        self._since: float | None = None  # when this runner first heard any worker

    def __contains__(self, worker: object) -> bool:
        """Whether the worker said anything while this runner listened."""
        return worker in self._heard

    @property
    def found(self) -> set[str]:
        """The instances running at the first look: up before this runner started."""
        return self._found or set()

    def word(self, worker: str, now: float) -> None:
        """``worker`` said something at ``now``."""
        self._heard[worker] = now
        if self._since is None:
            self._since = now

    def last(self, worker: str, default: float) -> float:
        """When ``worker`` was last heard from (``default``: never)."""
        return self._heard.get(worker, default)

    def listed(self, instances: Iterable[Instance], now: float) -> None:
        """What the fleet lists now: since when each instance has been running."""
        running = {i.name for i in instances if i.status == "running"}
        self._listed = {n: self._listed.get(n, now) for n in running}
        if self._found is None:
            self._found = running

    def silent(self, now: float, limit: float) -> set[str]:
        """Running instances not heard from for ``limit`` seconds (nor since they were first
        listed running): they work for no run (their worker never started, or froze). One
        never heard from counts from when this runner first listed it running, not from its
        creation, and not from before this runner began hearing (:meth:`_last_word`)."""
        return {
            name
            for name, since in self._listed.items()
            if now - self._last_word(name, since, limit) > limit
        }

    def unheard(self, now: float, limit: float) -> dict[str, float]:
        """Running instances never heard from and not yet :meth:`silent`, each with the
        seconds left before it is. One that froze before this runner started (a runner resumed
        with ``runner watch``) never speaks."""
        left = {
            name: self._last_word(name, since, limit) + limit - now
            for name, since in self._listed.items()
            if name not in self._heard
        }
        return {name: t for name, t in left.items() if t >= 0}

    def mute(self, now: float, limit: float, boot: float) -> set[str]:
        """Running instances never heard from, silent (as :meth:`silent` counts) longer than
        the ``boot`` allowance and the ``limit``: a worker that starts says it is idle, so
        one this late never started, or froze before its first word."""
        bound = max(limit, boot)
        return {
            name
            for name, since in self._listed.items()
            if name not in self._heard and now - self._last_word(name, since, limit) > bound
        }

    def _last_word(self, name: str, listed: float, limit: float) -> float:
        """Since when ``name`` has been silent as far as this runner can tell: its last word;
        for one never heard, since it was listed running or this runner began hearing (its
        events reach it from then), whichever is later; while this runner has heard no one at
        all, a bound later than its listing (its own ears may be what is slow)."""
        if name in self._heard:
            return max(listed, self._heard[name])
        if self._since is None:
            return listed + limit
        return max(listed, self._since)
