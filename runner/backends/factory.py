"""What a runner command works against: the configured deployment's queue, store, events, fleet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from runner.config import Config
from runner.engine.fleet import Fleet, LocalFleet
from runner.engine.runs import InputStager
from runner.engine.shards import RemoteLister
from worker import defaults
from worker.backends.base import Backends, local_run_events, open_local
from worker.clock import SYSTEM_CLOCK, Clock
from worker.queue import EventBus

LOCAL_IDLE_TIMEOUT = 30.0  # seconds a detached local worker lingers after its work is done
LOCAL_POLL_SECONDS = 0.02  # the watch loop's pace locally: a poll costs a few SQLite reads
LOCAL_QUIET_POLL_SECONDS = 0.25  # and while no event comes (a run of long shards)


@dataclass
class Deployment:
    config: Config
    backends: Backends
    make_fleet: Callable[[int, float | None], Fleet]  # (slots, idle timeout seconds) -> fleet
    lister: RemoteLister | None = None
    stage_input: InputStager | None = None
    default_workers: int = 4
    poll_seconds: float = defaults.WATCH_POLL_SECONDS  # the watch loop's pace (an API call each)
    quiet_poll_seconds: float | None = None  # its pace while no worker speaks (None: the same)
    closers: list[Callable[[], None]] = field(default_factory=list)
    # (run id, since: epoch seconds) -> that run's events plus the worker-level ones; the
    # caller closes it. Two runs watched at once never take each other's events.
    open_run_events: Callable[[str, float | None], EventBus] | None = None
    # (task folder, scratch folder) -> the folder to bundle (Google Cloud: requirements as
    # wheels the VMs install with no package index); None: the folder as it is.
    prepare_task: Callable[[Path, Path], Path] | None = None

    def run_events(self, run_id: str, *, since: float | None = None) -> EventBus:
        if self.open_run_events is None:
            return self.backends.events
        return self.open_run_events(run_id, since)

    def fleet(self, *, slots: int = defaults.SLOTS, idle_timeout: float | None = None) -> Fleet:
        return self.make_fleet(slots, idle_timeout)

    def close(self) -> None:
        self.backends.close()
        for close in self.closers:
            close()


def open_deployment(config: Config, *, clock: Clock = SYSTEM_CLOCK) -> Deployment:
    if config.is_local:
        root = config.store_dir
        backends = open_local(root, clock=clock)

        def make_fleet(slots: int, idle_timeout: float | None) -> Fleet:
            return LocalFleet(root, slots=slots, idle_timeout=idle_timeout or LOCAL_IDLE_TIMEOUT)

        import os

        def open_run_events(run_id: str, since: float | None) -> EventBus:
            return local_run_events(root, run_id, since=since, clock=clock)

        return Deployment(
            config=config,
            backends=backends,
            make_fleet=make_fleet,
            default_workers=max(os.cpu_count() or 1, 1),
            open_run_events=open_run_events,
            poll_seconds=LOCAL_POLL_SECONDS,
            quiet_poll_seconds=LOCAL_QUIET_POLL_SECONDS,
        )
    from runner.backends.gcp.deployment import (
        open_gcp_deployment,  # the cloud clients load only when needed
    )

    return open_gcp_deployment(config, clock=clock)
