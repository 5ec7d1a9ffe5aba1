"""How an attempt's task runs: a warm Python host, a fresh process, or a container.

``base`` holds what every executor shares (:class:`TaskExecutor`, ``RunningTask``, the
process registry); ``process`` is the executor for processes on this machine, with ``host``
(the warm process that imports ``task.py`` once) and ``host_client`` (the worker's side of its
pipes, spares started ahead), ``zygote`` and ``zygote_client`` (forking hosts fast) and
``reaper`` (stopping every process a shard started); ``container`` runs the same in podman or
docker. ``host`` and ``zygote`` are started as ``python -m``: the package
imports nothing, so they start without loading the rest.
"""
