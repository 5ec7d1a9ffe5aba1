"""Who asked for the VMs a run is waiting for.

The runs of a deployment share its group of VMs, and growing the group names no run: while a
new VM boots, and until it takes its first shard, nothing says which runner asked for it. A
runner with more VMs than its work needs deletes the ones still starting first, then idle ones
(:func:`runner.engine.policy.decide_scale`), and at its run's end every one it knows free:
without a word from the others it would delete the replacement another run's runner just asked
for (booting, or up and idle while the shard it is for is still held by the frozen VM's lapsing
lease), which then asks again, and so on for as long as the two runs last.

So each runner writes down the names its growth gave (``fleet/_asks/<run>.json`` in the store,
name -> when), and that it is growing before it asks (the new VMs are listed before the
growth's answer names them: meanwhile no other runner deletes a VM it did not ask for itself),
and leaves a VM another run asked for in the last ``stands`` seconds to that run's runner,
which deletes it if it needs it no more; the others' asks are read only when such a VM is about
to be deleted. A VM that will never work (one the group cannot create, or
that failed to boot) is not protected. The asks of a runner that died lapse with ``stands``,
and a runner forgets its own once its run's fleet is drained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runner.engine.fleet import Fleet
from worker.clock import Clock
from worker.store import Store

ASKS_PREFIX = "fleet/_asks/"
ASK_STANDS = 600.0  # seconds an ask keeps its VM from other runs' runners
GROWING = "*"  # the key that says a run is growing the group (no VM has this name)
GROWING_STANDS = 180.0  # seconds a growth may take (a resize's operation is given 120)


def asks_key(run_id: str) -> str:
    return f"{ASKS_PREFIX}{run_id}.json"


def _standing(data: bytes, now: float, stands: float) -> dict[str, float]:
    """The asks of one record made within ``stands`` of ``now`` (a malformed record: none)."""
    try:
        asked = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(asked, dict):
        return {}
    return {
        name: float(at)
        for name, at in asked.items()
        if isinstance(at, (int, float)) and math.isfinite(at) and now - at < stands
    }


@dataclass
class Asks:
    """One run's asks for VMs, and what the other runs' say."""

    store: Store
    run_id: str
    clock: Clock
    stands: float = ASK_STANDS

    def __post_init__(self) -> None:
        self._mine: set[str] = set()  # the VMs this runner asked for

    @property
    def key(self) -> str:
        return asks_key(self.run_id)

    def growing(self) -> None:
        """Say this run is about to grow the group: until :meth:`record` names what the growth
        gave, every VM another runner sees is this run's to wait for (a VM the group creates
        is listed before the growth's answer names it)."""
        self._write(lambda kept, now: kept.update({GROWING: now}))

    def grow(self, fleet: Fleet, count: int) -> list[str]:
        """Grow ``fleet`` by ``count``, saying so first and naming what it gave after."""
        self.growing()
        names: list[str] = []
        try:
            names = fleet.grow(count)
        finally:
            self.record(names)
        return names

    def record(self, names: Iterable[str]) -> None:
        """Write down that this run asked for these VMs now (kept with the run's earlier asks
        still standing, also those of an earlier runner of the same run); the growth is over."""
        new = sorted(names)
        self._mine.update(new)

        def add(kept: dict[str, float], now: float) -> None:
            kept.pop(GROWING, None)
            kept.update(dict.fromkeys(new, now))

        self._write(add)

    def _write(self, change: Callable[[dict[str, float], float], None]) -> None:
        now = self.clock.time()

        def merge(old: bytes) -> bytes:
            kept = _standing(old, now, self.stands)
            change(kept, now)
            return json.dumps(kept, sort_keys=True).encode()

        if not self.store.create(self.key, merge(b"{}")):
            self.store.update(self.key, merge)

    def elsewhere(self, names: Iterable[str]) -> set[str]:
        """Of these VMs, those another run asked for within ``stands``, and every one not
        this run's while another run is growing the group."""
        wanted = set(names)
        if not wanted:
            return set()
        keys = [k for k in self.store.list(ASKS_PREFIX, suffix=".json") if k != self.key]
        if not keys:
            return set()
        now = self.clock.time()
        theirs: set[str] = set()
        for data in self.store.get_many(keys).values():
            asked = _standing(data, now, self.stands)
            if now - asked.get(GROWING, float("-inf")) < GROWING_STANDS:
                theirs |= wanted - self._mine
            theirs |= wanted & asked.keys()
        return theirs

    def forget(self) -> None:
        """The run's fleet is drained: its asks protect nothing any more."""
        self.store.delete(self.key)
