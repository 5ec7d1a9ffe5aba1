"""The one exception family CFlow raises; the CLI turns each into a single clear line."""

from __future__ import annotations


class CFlowError(Exception):
    """Base class. ``str(err)`` is the one line a user sees; it says what to fix."""

    def __init__(self, message: str, *, run_id: str | None = None, shard_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id
        self.shard_id = shard_id


class ConfigError(CFlowError):
    """Bad options, configuration or deployment outputs."""


class TaskError(CFlowError):
    """The task folder or bundle is unusable."""


class InputError(CFlowError):
    """Shard inputs cannot be enumerated (empty glob, bad params line)."""


class RunNotFound(CFlowError):
    """No run with that id in the store."""


class RunStateError(CFlowError):
    """The run is in the wrong state for the request (e.g. retry while it is still going)."""


class NotFound(CFlowError):
    """A store key does not exist."""


class BackendError(CFlowError):
    """A backend (queue, store, fleet) could not do what was asked."""


class Unusable(BackendError):
    """A queue or topic that does not exist or may not be used: waiting will not mend it (a
    worker on a VM leaves its group rather than restart into the same refusal)."""


class DiskFull(BackendError):
    """The local store's disk is full: nothing was written; free space and go on."""
