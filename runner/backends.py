"""What a runner command works against: the configured deployment's queue, store, events, fleet."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from runner.config import Config
from runner.fleet import Fleet, LocalFleet
from runner.runs import InputStager
from runner.shards import RemoteLister
from worker import defaults
from worker.backends import Backends, open_local
from worker.clock import SYSTEM_CLOCK, Clock

LOCAL_IDLE_TIMEOUT = 30.0  # seconds a detached local worker lingers after its work is done


@dataclass
class Deployment:
    config: Config
    backends: Backends
    make_fleet: Callable[[int, float | None], Fleet]  # (slots, idle timeout seconds) -> fleet
    lister: RemoteLister | None = None
    stage_input: InputStager | None = None
    default_workers: int = 4
    poll_seconds: float = defaults.WATCH_POLL_SECONDS  # the watch loop's pace (an API call each)
    closers: list[Callable[[], None]] = field(default_factory=list)

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

        return Deployment(
            config=config,
            backends=backends,
            make_fleet=make_fleet,
            default_workers=max(os.cpu_count() or 1, 1),
        )
    from runner.gcp import open_gcp_deployment  # the cloud clients load only when needed

    return open_gcp_deployment(config, clock=clock)
