"""The queue, store, events and ledger a worker and the runner share, per backend.

``base`` holds :class:`Backends` (what a backend opens); ``local`` is the embedded SQLite
backend, ``gcp`` Pub/Sub and Cloud Storage. The worker's command line picks one; the two never
import each other, and only ``gcp`` imports the cloud SDKs.
"""

from worker.backends.base import Backends

__all__ = ["Backends"]
