"""What VMs report to the bucket when they cannot boot or cannot remove themselves
(``fleet/_problems/<vm>.json``), as :class:`runner.backends.gcp.fleet.GceFleet` reads them."""

from __future__ import annotations

import json
import logging

from worker.backends.gcp.vm import PROBLEMS_PREFIX
from worker.clock import Clock
from worker.store import Store

log = logging.getLogger("cflow.runner")

STALE_REPORT_SECONDS = 120.0  # a problem report of a VM no longer in the group is dropped after


class ProblemReports:
    """What VMs wrote to the bucket when they could not boot or remove themselves
    (``fleet/_problems/<vm>.json``), read, said and deleted on behalf of a :class:`GceFleet`.

    Args:
        store: the bucket (None: no report is read).
        clock: when a report of a VM gone from the group is old enough to delete.
    """

    def __init__(self, store: Store | None, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self.said: set[str] = set()  # VMs whose report was logged (and whose removal began)
        self._times: dict[str, float] = {}  # VM -> when its report was written

    def read(self) -> dict[str, str]:
        """VM name -> what it reported (failed boot, cannot remove itself)."""
        if self.store is None:
            return {}
        found = {}
        self._times = {}
        try:
            for key in self.store.list(PROBLEMS_PREFIX, suffix=".json"):
                record = json.loads(self.store.get(key))
                found[str(record["vm"])] = str(record["problem"])
                self._times[str(record["vm"])] = float(record.get("at", 0.0))
        except Exception as exc:  # the fleet still works without these reports
            log.warning("cannot read VM problem reports: %s", exc)
        return found

    def drop_stale(self, reported: dict[str, str], members: set[str]) -> None:
        """Delete the old reports of VMs that left the group (one that removed itself after a
        failed boot)."""
        if self.store is None:
            return
        now = self.clock.time()
        for name in set(reported) - members:
            if now - self._times.get(name, 0.0) > STALE_REPORT_SECONDS:
                try:
                    self.store.delete(f"{PROBLEMS_PREFIX}{name}.json")
                except Exception as exc:
                    log.warning("cannot delete the problem report of %s: %s", name, exc)

    def forget(self, names: set[str]) -> None:
        """Drop the problem reports of deleted VMs: a VM recreated under the name is new."""
        if self.store is None:
            return
        for name in names & self.said:
            try:
                self.store.delete(f"{PROBLEMS_PREFIX}{name}.json")
            except Exception as exc:
                log.warning("cannot delete the problem report of %s: %s", name, exc)
            self.said.discard(name)
