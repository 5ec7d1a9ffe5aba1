"""Machine shapes on Google Cloud: runs on their own machine type, GPUs or standard VMs.

``model`` holds the pure rules (a run's shape from its options; no client), ``checks`` what the
zone and the quota allow, ``groups`` makes or reuses a shape's template and group, ``queues``
its topic and subscription, ``apply`` points a run at them, ``fallback`` moves a run's
preempted shards to standard VMs, ``cleanup`` removes what no run uses. The package imports
nothing.
"""
