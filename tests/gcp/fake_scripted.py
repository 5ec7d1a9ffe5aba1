"""Faults a test scripts on the fake Compute API (``FakeCompute.fail_next``), in the wire format
Google's front end answers with."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tests.gcp.fault_compute import api_error

RESET = 0  # fail_next's status for a connection reset instead of an answer


@dataclass
class Scripted:
    """A fault a test asked for: the next ``times`` calls matching answer ``status``."""

    method: str
    path: re.Pattern[str]
    status: int
    reason: str
    times: int
    lost: bool

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path.search(path) is not None

    def answer(self) -> tuple[int, Any]:
        if self.status == RESET:
            return RESET, None
        if self.status == 504:  # how Google's front end words a DEADLINE_EXCEEDED
            return 504, {
                "error": {
                    "code": 504,
                    "message": "Deadline expired before operation could complete.",
                    "status": "DEADLINE_EXCEEDED",
                }
            }
        return api_error(self.status, f"scripted {self.status} {self.reason}", reason=self.reason)
