"""CFlow from Python: run a function over many items, on this machine or on Google Cloud.

::

    import cflow

    results = cflow.map(fit, paths, workers=8)            # local; blocks; input order
    run = cflow.submit(fit, paths, deployment="cflow-outputs.json", retries=3)
    for item, value in run.as_completed(): ...
    run.results(); run.progress(); run.cancel(); cflow.attach(run.id)

A run made here is a run like any other: ``runner runs``, ``status``, ``watch``, ``cancel`` and
``report`` see it, and :func:`attach` takes one from anywhere. Nothing in the project imports
this package; it builds on ``runner`` and ``worker``.
"""

from cflow.api import attach, map, submit
from cflow.errors import RemoteError, ShardFailed
from cflow.results import Progress, Results
from cflow.run import Run
from worker.errors import (
    ConfigError,  # a mistake found before anything is published
    RunStateError,  # a run cancelled before its items were done, whose values are asked for
)
from worker.pyfunc import (
    ItemTimedOut,  # raised in an item past its timeout, on the worker
    UnpicklableValue,  # an item's value will not pickle to come back
)

__all__ = [
    "ConfigError",
    "ItemTimedOut",
    "Progress",
    "RemoteError",
    "Results",
    "Run",
    "RunStateError",
    "ShardFailed",
    "UnpicklableValue",
    "attach",
    "map",
    "submit",
]
