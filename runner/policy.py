"""The scale policy: how many workers a run should have, and which may be removed.

Pure functions of what the runner knows, so the watch loop, the tests and the fleet simulator
all run the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from runner.fleet import Instance


@dataclass(frozen=True)
class ScaleDecision:
    add: int = 0
    delete: list[str] = field(default_factory=list)


def decide_scale(
    *,
    outstanding: int,
    max_workers: int,
    slots: int,
    instances: list[Instance],
    idle: set[str],
    busy: set[str],
) -> ScaleDecision:
    """How to resize: enough instances for the outstanding shards, removing only idle ones.

    ``outstanding`` counts queued plus running shards. When nothing is outstanding every
    instance not known busy goes (so the run ends at zero even for instances that never
    reported); otherwise only instances that said they are idle may go.
    """
    live = [i for i in instances if i.status != "stopping"]
    target = min(max_workers, math.ceil(max(outstanding, 0) / max(slots, 1)))
    if len(live) < target:
        return ScaleDecision(add=target - len(live))
    surplus = len(live) - target
    if surplus <= 0:
        return ScaleDecision()
    if outstanding <= 0:
        candidates = [i.name for i in live if i.name not in busy]
    else:
        candidates = [i.name for i in live if i.name in idle and i.name not in busy]
    return ScaleDecision(delete=sorted(candidates)[:surplus])
