"""The embedded local backend: a SQLite store and queue under ``.cflow/``, worker processes.

``deployment`` opens it, ``fleet`` starts and stops the local worker processes, ``doctor``
checks this machine for ``runner doctor --local``.
"""

from runner.backends.local.deployment import open_local_deployment
from runner.backends.local.fleet import LocalFleet

__all__ = ["LocalFleet", "open_local_deployment"]
