"""The worker agent: the loop that claims shards, runs their attempts and commits the results.

``agent`` (:class:`Agent`) owns the slots and the worker's lifetime; each concern has one owner:
``slot`` (a slot's deliveries and prefetch), ``runbook`` (the runs' manifests and health),
``halt_rule`` (the ``--halt`` rule and the failure reasons it compares),
``books`` (claims, settling and the ledger), ``attempt`` (one attempt from prepare to finish),
``files`` (staging inputs, sealing outputs, the attempt's log), ``pool`` (warm executors per
bundle) and ``lifetime`` (what the worker records when it stops).
"""

from worker.agent.agent import Agent, AgentConfig
from worker.agent.slot import Claim

__all__ = ["Agent", "AgentConfig", "Claim"]
