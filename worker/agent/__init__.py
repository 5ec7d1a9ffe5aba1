"""The worker agent: the loop that claims shards, runs their attempts and commits the results.

``agent`` (:class:`Agent`) owns the slots and the worker's lifetime; each concern has one owner:
``slot`` (a slot's deliveries and prefetch), ``runbook`` (the runs' manifests and health),
``halt_rule`` (the ``--halt`` rule and the failure reasons it compares),
``books`` (claims, settling and the ledger), ``attempt`` (one attempt from prepare to finish),
``files`` (staging inputs, sealing outputs, the attempt's log), ``pool`` (warm executors per
bundle) and ``lifetime`` (what the worker records when it stops).

Import each from its module: the runner reads ``halt_rule`` alone, and a package that loaded
the whole agent to give it would cost every ``runner`` command the agent's imports.
"""
