"""Where a run runs: the embedded local backend and Google Cloud, behind the engine's port.

:func:`open_deployment` (``factory``) picks one from the configuration; ``local`` and ``gcp``
each implement :class:`runner.engine.deployment.Deployment` and never import each other. The
Google Cloud package loads only when a deployment asks for it.
"""

from runner.backends.factory import open_deployment

__all__ = ["open_deployment"]
