"""A fault plan: which calls of the fakes fail, and how, drawn at random from a seed.

One ``FaultPlan`` drives every faulty part of the Google Cloud test path: the fake Compute API
(``FakeCompute(..., faults=plan)``, tests/gcp/fault_compute.py), the HTTP proxy in front of
fake-gcs-server and the gRPC proxy in front of the Pub/Sub emulator (tests/gcp/fault_proxies.py).
Each of them asks the plan, call by call, whether this call fails and which way.

The API, kept stable for the tests and soaks built on it:

- ``FaultPlan(rate=0.0, seed=0, *, kinds=None, hang=1.0, delay=1.0)``: each call fails with
  probability ``rate``; ``kinds`` limits the faults to those names (None: every kind a part
  knows); ``hang`` is how long a "timeout" fault holds its answer, in seconds, before it drops the
  connection; ``delay`` is the most a slow operation stays PENDING/RUNNING, or a new VM takes to
  appear, in seconds. At rate 0 every call passes through unchanged.
- ``plan.draw(site, kinds) -> str | None``: the fault for the next call at ``site`` (a name such
  as ``"compute:POST resize"``, ``"gcs:PUT"``, ``"pubsub:Pull"``), one of ``kinds`` or None.
  Deterministic per seed: the n-th call at a site gets the same answer in every run, whatever
  threads interleave between sites.
- ``plan.uniform(site) -> float``: a deterministic draw in [0, 1) (how long, which code).
- ``plan.injected`` (a ``Counter`` of ``(site, kind)``), ``plan.total(kind=None)``: what the plan
  injected, so a test can assert that faults really happened.
- ``plan.suspended()``: a context manager under which nothing is injected (set-up, checks).

The kinds each part draws (``kinds=`` names a subset; tests/gcp/fault_compute.py and
tests/gcp/fault_proxies.py say what each does): Compute calls ``5xx``, ``rate_limit``,
``timeout``, ``reset``, and for mutations ``slow_operation``, ``operation_error``; Compute VM
creation ``slow_create``, ``stockout`` (Spot VMs); Cloud Storage ``503``, ``500``, ``429``;
Pub/Sub ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, and ``cut_stream`` for a
streaming pull.

Thread-safe: every part calls it from its own server threads.
"""

from __future__ import annotations

import hashlib
import threading
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager

# Every kind of fault a part knows; ``kinds`` names a subset.
COMPUTE_KINDS = ("5xx", "rate_limit", "timeout", "reset", "slow_operation", "operation_error")
SLOW_CREATE = "slow_create"
COMPUTE_CREATE_KINDS = ("stockout",)
GCS_KINDS = ("503", "500", "429")
PUBSUB_KINDS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "cut_stream")


class FaultPlan:
    """Which calls fail and how: each with probability ``rate``, drawn from ``seed``."""

    def __init__(
        self,
        rate: float = 0.0,
        seed: int = 0,
        *,
        kinds: Collection[str] | None = None,
        hang: float = 1.0,
        delay: float = 1.0,
    ):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"a fault rate is a probability in [0, 1], not {rate}")
        self.rate = rate
        self.seed = seed
        self.kinds = None if kinds is None else frozenset(kinds)
        self.hang = hang  # seconds a "timeout" holds its answer
        self.delay = delay  # seconds at most an operation stays pending, a new VM takes to appear
        self.injected: Counter[tuple[str, str]] = Counter()
        self._calls: Counter[str] = Counter()
        self._suspended = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        kinds = "" if self.kinds is None else f", kinds={sorted(self.kinds)}"
        return f"FaultPlan(rate={self.rate}, seed={self.seed}{kinds})"

    def _unit(self, site: str, n: int, salt: str) -> float:
        digest = hashlib.blake2b(f"{self.seed}/{site}/{n}/{salt}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def draw(self, site: str, kinds: Sequence[str]) -> str | None:
        """The fault for the next call at ``site``: one of ``kinds`` (as allowed), or None."""
        allowed = [k for k in kinds if self.kinds is None or k in self.kinds]
        with self._lock:
            n = self._calls[site]
            self._calls[site] += 1
            if self._suspended or not allowed or self.rate <= 0.0:
                return None
            if self._unit(site, n, "fails") >= self.rate:
                return None
            kind = allowed[int(self._unit(site, n, "kind") * len(allowed))]
            self.injected[(site, kind)] += 1
            return kind

    def uniform(self, site: str) -> float:
        """A deterministic draw in [0, 1) for ``site`` (its n-th draw is the same every run)."""
        key = f"uniform:{site}"
        with self._lock:
            n = self._calls[key]
            self._calls[key] += 1
        return self._unit(key, n, "u")

    def total(self, kind: str | None = None) -> int:
        """How many faults were injected (of ``kind``, or of every kind)."""
        with self._lock:
            return sum(c for (_, k), c in self.injected.items() if kind is None or k == kind)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Inject nothing inside the block (calls still count, so draws stay deterministic)."""
        with self._lock:
            self._suspended += 1
        try:
            yield
        finally:
            with self._lock:
                self._suspended -= 1
