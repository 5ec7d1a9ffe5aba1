"""The embedded backend: one SQLite database and a folder of objects, shared by every process.

``backend`` opens it (:func:`open_local`, with the batching ledger); ``db`` is the database,
``queue``, ``store`` and ``ledger`` the contract's implementations over it.
"""

from worker.backends.local.backend import local_run_events, open_local

__all__ = ["local_run_events", "open_local"]
