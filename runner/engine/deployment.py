"""What a runner command works against: a deployment's queue, store, events and fleet.

:class:`Deployment` is the port every backend fills in (``runner.backends.local.deployment``,
``runner.backends.gcp.deployment``); :class:`Check` is one finding of ``runner doctor``, shaped
the same for every backend. Nothing here knows an implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from runner.config import Config
from runner.engine.fleet import Fleet
from runner.engine.runs import InputStager
from runner.engine.shards import RemoteLister
from worker import defaults
from worker.backends.base import Backends
from worker.queue import EventBus

if TYPE_CHECKING:
    from runner.results.parts import Combiner


@dataclass
class Deployment:
    """A backend's clients and settings, as the runner's commands use them."""

    config: Config
    backends: Backends
    make_fleet: Callable[[int, float | None], Fleet]  # (slots, idle timeout seconds) -> fleet
    # (run id, slots, idle timeout seconds) -> the fleet of that run's own workers, where a
    # backend starts workers per run (locally: processes in the environment of the runner that
    # starts them, serving no other run); None: one fleet serves every run (Google Cloud VMs).
    make_run_fleet: Callable[[str, int, float | None], Fleet] | None = None
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
    # How combining is done where the store keeps the parts (Google Cloud: composed in the
    # bucket); None: concatenated on this machine (runner.results.combine).
    combiner: Combiner | None = None

    def run_events(self, run_id: str, *, since: float | None = None) -> EventBus:
        """One run's event stream (the deployment's shared one where runs are not kept apart)."""
        if self.open_run_events is None:
            return self.backends.events
        return self.open_run_events(run_id, since)

    def fleet(
        self,
        *,
        slots: int = defaults.SLOTS,
        idle_timeout: float | None = None,
        run_id: str | None = None,
    ) -> Fleet:
        """A fleet of workers with ``slots`` each (``idle_timeout``: where the runner sets it).

        ``run_id``: the fleet that runs that run, which is the run's own where the backend
        starts workers per run (:attr:`make_run_fleet`); without it, every worker there is.
        """
        if run_id is not None and self.make_run_fleet is not None:
            return self.make_run_fleet(run_id, slots, idle_timeout)
        return self.make_fleet(slots, idle_timeout)

    def close(self) -> None:
        """Close the clients, then whatever the backend added to :attr:`closers`."""
        self.backends.close()
        for close in self.closers:
            close()


@dataclass(frozen=True)
class Check:
    """One finding of ``runner doctor``: ``ok`` or not, and a line saying what was found or what
    to fix."""

    name: str
    ok: bool
    detail: str

    def to_dict(self) -> dict[str, object]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail}
