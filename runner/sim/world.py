"""What the simulated VMs and workers share: the backends, the clock, the dice and the ledger."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from runner.sim.clock import SimClock
from runner.sim.ledger import Ledger
from runner.sim.workload import Shards
from worker.agent.agent import AgentConfig
from worker.queue import EventBus, WorkQueue
from worker.store import Store


@dataclass(frozen=True)
class VmModel:
    """A Spot VM's life in a managed instance group. Times are medians in seconds; each is drawn
    lognormally with ``spread``."""

    create_seconds: float = 15.0  # resize call until the VM runs (provisioning, staging)
    boot_seconds: float = 40.0  # guest boot until the startup script runs
    install_seconds: float = 35.0  # startup script: venv, worker wheel and its dependencies
    spread: float = 0.25
    preempt_per_hour: float = 0.0  # Spot preemption hazard per VM-hour
    shutdown_window: float = 30.0  # preemption notice until the VM is gone
    stop_seconds: float = 3.0  # SIGTERM until the nack: stop the task, upload its log, record it
    lost_stop_rate: float = 0.05  # preemptions whose worker never gets to nack (lease lapses)
    delete_seconds: float = 10.0  # delete call until an idle VM is gone and no longer billed
    recreate_seconds: float = 30.0  # the group notices a preempted VM and asks for a new one
    restart_seconds: float = 5.0  # systemd restarts a worker process that died
    boot_fail_rate: float = 0.0  # share of VMs whose startup script fails (apt, download, pip)
    boot_fail_seconds: float = 30.0  # a failed boot's report and self-removal until it is gone
    quota_vms: int | None = None  # VMs the region's CPU quota allows at once (None: no limit)
    quota_retry_seconds: float = 30.0  # the group retries creating a VM blocked by quota

    @property
    def ready_seconds(self) -> float:
        """Median time from the resize call to the worker's first pull."""
        return self.create_seconds + self.boot_seconds + self.install_seconds

    def draw(self, rng: random.Random, median: float) -> float:
        return median * math.exp(rng.gauss(0.0, self.spread))


@dataclass
class World:
    clock: SimClock
    queue: WorkQueue
    store: Store
    events: EventBus
    shards: Shards
    ledger: Ledger
    rng: random.Random
    vm: VmModel
    agent: AgentConfig  # every worker's configuration but its name
