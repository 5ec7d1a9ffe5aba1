"""Opening the configured deployment: the local one, or Google Cloud's."""

from __future__ import annotations

from runner.backends.local.deployment import open_local_deployment
from runner.config import Config
from runner.engine.deployment import Deployment
from worker.clock import SYSTEM_CLOCK, Clock


def open_deployment(config: Config, *, clock: Clock = SYSTEM_CLOCK) -> Deployment:
    """The deployment ``config`` names, its clients open (the caller closes it)."""
    if config.is_local:
        return open_local_deployment(config, clock=clock)
    from runner.backends.gcp.deployment import (
        open_gcp_deployment,  # the cloud clients load only when needed
    )

    return open_gcp_deployment(config, clock=clock)
