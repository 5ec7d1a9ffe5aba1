"""The Google Cloud backend of the worker: Pub/Sub for work and events, Cloud Storage for data.

``backend`` opens it, ``pubsub`` (with ``pubsub_leases``, ``pubsub_inbox``, ``pubsub_events``
and ``pubsub_api``) is the queue and the event bus, ``gcs`` the store, ``vm`` what a worker does
on its VM (leaving its group, uploading its log). The package imports nothing, so the cloud
clients load only where they are used.
"""
