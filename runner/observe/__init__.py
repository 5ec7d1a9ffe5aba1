"""Looking at a run after the fact: shard logs, the run's timeline, the report and prices.

``logs`` finds and reads a shard's log; ``timeline`` rebuilds a run from its events and records;
``render`` draws the report (matplotlib, loaded only by ``runner report``); ``prices`` reads
the machine prices the report and the fallback policy use. The package imports nothing.
"""
