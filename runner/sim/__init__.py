"""The fleet simulator: the runner's own watch loop and scale policy, and the worker agent's own
claim, commit, retry and preemption handling, run against a simulated Spot fleet, Pub/Sub and
bucket on virtual time. ``bench/simulate.py`` runs the scenarios; ``tests/sim`` checks that no
shard is lost and each commits once."""

from runner.sim.scenario import Result, Scenario, simulate
from runner.sim.workload import Workload
from runner.sim.world import VmModel

__all__ = ["Result", "Scenario", "VmModel", "Workload", "simulate"]
