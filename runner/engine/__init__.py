"""What a run is and how it moves: the deployment port, runs and shards, checks, the watch loop.

``deployment`` is the port every backend implements (:class:`Deployment`, the doctor's
:class:`Check`); ``fleet`` the fleet's base types; ``runs``, ``reports`` and ``listing`` read
and write a run in the store; ``shards`` and ``plan`` turn inputs into shards; ``checks`` vets a
task before anything is published; ``watch``, ``run_view``, ``lost``, ``halt`` and ``policy`` are
the watch loop, what it knows of a run, lost-shard detection, fail-fast and the scale policy;
``prune`` removes old runs. Nothing here imports a backend.
"""

from runner.engine.deployment import Check, Deployment
from runner.engine.fleet import Fleet, Instance

__all__ = ["Check", "Deployment", "Fleet", "Instance"]
