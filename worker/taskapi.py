"""What a task sees: the ``shard`` passed to ``run(shard)`` and the ``CFLOW_*`` environment.

Environment variables (set for both ``task.py`` and ``task.sh``):

- ``CFLOW_RUN_ID``, ``CFLOW_SHARD_ID``, ``CFLOW_SHARD_INDEX``, ``CFLOW_ATTEMPT``
- ``CFLOW_INPUT``: the staged input file (or its URI with ``--no-stage``); empty for params shards
- ``CFLOW_OUTPUT_DIR``: write outputs here; they are uploaded and combined
- ``CFLOW_PARAMS``: the shard's params as JSON (``{}`` when none)

What ``run(shard)`` returns, when not None, is the shard's result value: it must be JSON (a dict,
list, str, number, bool or null; no NaN) of at most :data:`RETURN_LIMIT` bytes, and is kept in the
shard's ``result.json`` by the attempt that commits. The task's process leaves it in the output
folder as :data:`RETURN_FILE` (:func:`keep_return`); the worker takes it from there before the
outputs are sealed. Runs on the task's interpreter, which in a container image may be Python 3.9.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RETURN_FILE = ".cflow-return.json"  # run()'s return value, on its way to result.json
RETURN_LIMIT = 64 * 1024  # bytes of JSON a return value may take; more belongs in a file


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


def keep_return(shard: TaskShard, value: Any) -> None:
    """Leave what ``run(shard)`` returned for the worker to keep (nothing for None), in the
    output folder (:data:`RETURN_FILE`).

    Raises:
        TypeError: the value is not JSON.
        ValueError: it is larger than :data:`RETURN_LIMIT`, or holds NaN or infinity.
    """
    text = return_text(value)
    if text is not None:
        Path(shard.output_dir, RETURN_FILE).write_text(text, encoding="utf-8")


def return_text(value: Any) -> str | None:
    """What ``run(shard)`` returned, as the JSON the worker keeps (None for None); a warm
    host sends it in its reply instead of a file.

    Raises:
        TypeError: the value is not JSON.
        ValueError: it is larger than :data:`RETURN_LIMIT`, or holds NaN or infinity.
    """
    if value is None:
        return None
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except TypeError as exc:
        raise TypeError(
            f"run(shard) returned a {type(value).__name__}, which is not JSON ({exc}); return"
            " a dict, list, str, number or bool, or write it to a file in shard.output_dir"
        ) from None
    except ValueError as exc:
        raise ValueError(f"run(shard) returned a value JSON cannot hold: {exc}") from None
    size = len(text)  # json.dumps escapes every character past ASCII: a character a byte
    if size > RETURN_LIMIT:
        raise ValueError(
            f"run(shard) returned {size} bytes of JSON, over the {RETURN_LIMIT} kept in"
            " result.json; write it to a file in shard.output_dir instead"
        )
    return text
