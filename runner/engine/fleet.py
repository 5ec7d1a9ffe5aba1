"""The fleet of workers, as the runner sees it: named instances it grows and deletes.

A **fleet** is a set of named worker instances: processes on this machine
(``runner.backends.local.fleet``), or VMs in a managed instance group
(``runner.backends.gcp.fleet``). The runner grows it to the work at hand and shrinks it by
deleting *idle* instances by name, never by blindly lowering a size (which can kill a busy VM).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Instance:
    """One worker of a fleet, by name, as the fleet reports it."""

    name: str
    status: str = "running"  # "starting" | "running" | "stopping"
    # Why the instance is not (or will never be) doing work, e.g. "QUOTA_EXCEEDED: ..." for
    # one the group cannot create, "failed to boot: ..." for a VM whose worker never started.
    # Such an instance is not capacity (runner.engine.policy).
    error: str | None = None
    removable: bool = False  # exists but will never work: the runner deletes it


class Fleet(ABC):
    """The workers a run may use, grown and shrunk by name (:mod:`runner.engine.policy`)."""

    @abstractmethod
    def instances(self) -> list[Instance]:
        """Instances that exist now (including ones still starting)."""

    @abstractmethod
    def grow(self, count: int) -> list[str]:
        """Add ``count`` instances; their names."""

    @abstractmethod
    def delete(self, names: Iterable[str]) -> None:
        """Remove these instances (the caller has checked they are idle)."""

    def wait_empty(self, timeout: float) -> bool:
        """Wait for deleted instances to be gone; True when none is left."""
        return not self.instances()

    def wait_for_an_exit(self, seconds: float) -> bool:
        """Wait up to ``seconds``, ending as soon as one of its instances ends, where the fleet
        can tell (True); False: it cannot, and waited not at all (the caller sleeps)."""
        return False

    def problems(self) -> list[str]:
        """One line per thing the user should know about the fleet (quota, failed boots)."""
        return []

    def disk_full(self) -> str | None:
        """Why the workers cannot write anything (a full local disk), or None."""
        return None

    max_size: int | None = None  # the most instances the fleet can hold, where it has a limit
    # An instance listed "stopping" once deleted goes by itself, whatever its guest does (a
    # managed group's VM): the drain after a run does not wait for it to vanish.
    deletes_by_itself: bool = False
    # Its instances are listed starting for a while after they are asked for (a VM boots),
    # when another run's runner could take one for spare: who asked is written down
    # (runner.engine.asks).
    lists_starting: bool = False

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients."""
