"""What a task sees: the ``shard`` passed to ``run(shard)`` and the ``CFLOW_*`` environment.

Environment variables (set for both ``task.py`` and ``task.sh``):

- ``CFLOW_RUN_ID``, ``CFLOW_SHARD_ID``, ``CFLOW_SHARD_INDEX``, ``CFLOW_ATTEMPT``
- ``CFLOW_INPUT``: the staged input file (or its URI with ``--no-stage``); empty for params shards
- ``CFLOW_OUTPUT_DIR``: write outputs here; they are uploaded and combined
- ``CFLOW_PARAMS``: the shard's params as JSON (``{}`` when none)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TaskShard:
    """The argument of ``run(shard)``."""

    run_id: str
    id: str
    index: int
    attempt: int
    input: str | None
    output_dir: Path
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def input_path(self) -> Path | None:
        """The input as a local path (None for params shards or unstaged remote inputs)."""
        if not self.input or "://" in self.input:
            return None
        return Path(self.input)

    def env(self) -> dict[str, str]:
        return {
            "CFLOW_RUN_ID": self.run_id,
            "CFLOW_SHARD_ID": self.id,
            "CFLOW_SHARD_INDEX": str(self.index),
            "CFLOW_ATTEMPT": str(self.attempt),
            "CFLOW_INPUT": self.input or "",
            "CFLOW_OUTPUT_DIR": str(self.output_dir),
            "CFLOW_PARAMS": json.dumps(self.params, sort_keys=True),
        }

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TaskShard:
        e = os.environ if env is None else env
        return cls(
            run_id=e["CFLOW_RUN_ID"],
            id=e["CFLOW_SHARD_ID"],
            index=int(e.get("CFLOW_SHARD_INDEX", "0")),
            attempt=int(e["CFLOW_ATTEMPT"]),
            input=e.get("CFLOW_INPUT") or None,
            output_dir=Path(e["CFLOW_OUTPUT_DIR"]),
            params=json.loads(e.get("CFLOW_PARAMS") or "{}"),
        )
