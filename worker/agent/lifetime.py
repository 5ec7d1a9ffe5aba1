"""``fleet/<worker>/lifetime.json``: when this worker started, was last seen and stopped."""

from __future__ import annotations

import json
import logging
import os

from worker.clock import Clock
from worker.errors import BackendError
from worker.store import Store

log = logging.getLogger("cflow.worker")


class Lifetime:
    """This worker's lifetime record, which the run report bills by."""

    def __init__(self, store: Store, clock: Clock, worker: str, *, run: str | None = None):
        self.store = store
        self.clock = clock
        self.worker = worker
        self.run = run  # the one run a local worker serves: its leftovers go with that run
        self.started_at: float | None = None  # wall time of the first record

    def record(self, *, stopped: bool, reason: str | None = None) -> None:
        """Write the record now (``stopped``: this is the last, ``reason`` why, when the agent
        did not end by itself: its queue refused it); a failure is only logged."""
        now = self.clock.time()
        if self.started_at is None:
            self.started_at = now
        record = {
            "worker": self.worker,
            "started_at": self.started_at,
            "last_seen": now,
            "stopped_at": now if stopped else None,
            "machine_type": os.environ.get("CFLOW_MACHINE_TYPE") or None,
        }
        if self.run is not None:
            record["run"] = self.run
        if reason is not None:
            record["stop_reason"] = reason
        try:
            self.store.put(
                f"fleet/{safe_name(self.worker)}/lifetime.json",
                json.dumps(record, sort_keys=True).encode(),
            )
        except (BackendError, OSError):
            log.warning("could not record this worker's lifetime", exc_info=True)


def safe_name(name: str) -> str:
    """A worker name made safe for a path segment."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name) or "worker"
