"""What the simulated tasks do: how long each attempt runs and how it ends."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """Shard count and the distribution of attempt durations and outcomes.

    A shard's base duration is drawn once (``median_seconds`` with lognormal spread ``sigma``;
    ``sigma=0`` is fixed). ``tail_fraction`` of shards are ``tail_factor`` times slower: the
    shard's own data (``tail_per_attempt=False``, a retry is as slow) or the attempt's machine
    (``tail_per_attempt=True``, a straggler: another attempt of the same shard runs at the
    usual speed).
    """

    shards: int
    median_seconds: float
    sigma: float = 0.0
    attempt_sigma: float = 0.0  # noise between attempts of one shard
    tail_fraction: float = 0.0
    tail_factor: float = 1.0
    tail_per_attempt: bool = False
    failure_rate: float = 0.0  # chance an attempt exits non-zero (a flaky task)
    poison_fraction: float = 0.0  # shards whose every attempt exits non-zero
    crash_fraction: float = 0.0  # shards whose attempts take their worker down with them


@dataclass(frozen=True)
class AttemptPlan:
    seconds: float
    exit_code: int = 0
    crash: bool = False  # the worker process dies at the end instead of reporting


class Shards:
    """The drawn durations and fates of one run's shards, by shard index."""

    def __init__(self, workload: Workload, rng: random.Random):
        self.workload = workload
        self._rng = rng
        w = workload
        self.base = [
            w.median_seconds * (math.exp(rng.gauss(0.0, w.sigma)) if w.sigma else 1.0)
            for _ in range(w.shards)
        ]
        n = w.shards
        self.slow = _pick(rng, n, 0 if w.tail_per_attempt else w.tail_fraction)
        self.poison = _pick(rng, n, w.poison_fraction)
        self.crash = _pick(rng, n, w.crash_fraction)
        for i in self.slow:
            self.base[i] *= w.tail_factor

    @property
    def total_seconds(self) -> float:
        """Work in the first attempt of every shard, with no failures or duplicates."""
        return sum(self.base)

    @property
    def longest_seconds(self) -> float:
        return max(self.base, default=0.0)

    def plan(self, index: int) -> AttemptPlan:
        w, rng = self.workload, self._rng
        seconds = self.base[index]
        if w.attempt_sigma:
            seconds *= math.exp(rng.gauss(0.0, w.attempt_sigma))
        if w.tail_per_attempt and rng.random() < w.tail_fraction:
            seconds *= w.tail_factor
        if index in self.crash:
            return AttemptPlan(seconds, exit_code=-9, crash=True)
        if index in self.poison or rng.random() < w.failure_rate:
            return AttemptPlan(seconds * rng.uniform(0.05, 1.0), exit_code=1)
        return AttemptPlan(seconds)


def _pick(rng: random.Random, n: int, fraction: float) -> set[int]:
    k = round(n * fraction)
    return set(rng.sample(range(n), k)) if k else set()
