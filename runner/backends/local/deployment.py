"""The local deployment: a SQLite queue and a store folder on this machine, worker processes
started per run."""

from __future__ import annotations

import os
import weakref

from runner.backends.local.fleet import LocalFleet
from runner.config import Config
from runner.engine.deployment import Deployment
from runner.engine.fleet import Fleet
from worker.backends.local.backend import local_run_events, open_local
from worker.clock import SYSTEM_CLOCK, Clock
from worker.queue import EventBus

LOCAL_IDLE_TIMEOUT = 30.0  # seconds a detached local worker lingers after its work is done
LOCAL_POLL_SECONDS = 0.02  # the watch loop's pace locally: a poll costs a few SQLite reads
LOCAL_QUIET_POLL_SECONDS = 0.25  # and while no event comes (a run of long shards)


def open_local_deployment(config: Config, *, clock: Clock = SYSTEM_CLOCK) -> Deployment:
    """The store folder's queue, store and events, and worker processes as the fleet."""
    root = config.store_dir
    backends = open_local(root, clock=clock)
    # What was opened through the deployment closes with it: each holds connections to the
    # store's file, which would stay open until collected (and be closed, a checkpoint each,
    # before the caller's next fork: runner.backends.local.launcher).
    opened: weakref.WeakSet[Fleet | EventBus] = weakref.WeakSet()  # one collected closed itself

    def make_fleet(slots: int, idle_timeout: float | None) -> Fleet:
        fleet = LocalFleet(root, slots=slots, idle_timeout=idle_timeout or LOCAL_IDLE_TIMEOUT)
        opened.add(fleet)
        return fleet

    def make_run_fleet(run_id: str, slots: int, idle_timeout: float | None) -> Fleet:
        # A worker process keeps the environment it was started in: one run's never runs
        # another's shards (its variables, --slots, --image and options are the run's own).
        idle = idle_timeout or LOCAL_IDLE_TIMEOUT
        fleet = LocalFleet(root, run_id=run_id, slots=slots, idle_timeout=idle)
        opened.add(fleet)
        return fleet

    def open_run_events(run_id: str, since: float | None) -> EventBus:
        events = local_run_events(root, run_id, since=since, clock=clock)
        opened.add(events)
        return events

    def close_opened() -> None:
        for each in list(opened):
            each.close()

    return Deployment(
        config=config,
        backends=backends,
        make_fleet=make_fleet,
        make_run_fleet=make_run_fleet,
        default_workers=max(os.cpu_count() or 1, 1),
        open_run_events=open_run_events,
        poll_seconds=LOCAL_POLL_SECONDS,
        quiet_poll_seconds=LOCAL_QUIET_POLL_SECONDS,
        closers=[close_opened],
    )
