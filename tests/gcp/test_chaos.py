"""The chaos soak's short form: ``bench/chaos.py --quick``, a few seeds of :mod:`tests.gcp.chaos`
at once, in a process of its own (this test is also that benchmark's quick-form test).

Each seed runs two whole runs on the emulators and the fake Compute API (one of them shaped,
with the standard-VM fallback) under faults on every kind of call (Compute, Cloud Storage and
Pub/Sub, with the proxies that hold Cloud Storage to one write a second to an object), a Spot
preemption, a runner killed and resumed with ``runner watch``, and a VM frozen; the benchmark
checks that every shard committed exactly once, both runs finished, no VM was left, and no VM
idled past the bound, and exits 1 when a seed fails. ``bench/chaos.py`` runs the long form (50
seeds); ``bench/chaos.py --seed N`` reruns a seed that failed here.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests import emulators
from tests.bench.quick import BENCH, run_quick
from tests.gcp.chaos import IDLE_BOUND, Plan
from tests.gcp.chaos_checks import Lifetimes, SeedResult, tally

# The quick form's seeds (bench/chaos.py's QUICK_SEEDS) and shards per run. Together they
# preempt with notice (the fallback), kill and resume each run's runner, freeze a VM for good
# and thaw one, and fail a shard on purpose.
SEEDS = (10, 13)
SHARDS = 4
# One line a seed: seed, s, VMs, VM-s, busy, idle, idle%, max idle, faults, tries, verdict.
SEED_LINE = re.compile(
    r"^ *(?P<seed>\d+) +[\d.]+ +\d+ +\d+ +\d+ +\d+ +[\d.]+ +[\d.]+ +(?P<faults>\d+) +\d+  "
    r"(?P<verdict>ok|FAIL: .*?)  \[",
    re.MULTILINE,
)


@pytest.mark.e2e
@pytest.mark.emulator
def test_a_few_seeds_of_chaos_keep_every_promise(tmp_path: Path) -> None:
    assert {Plan.draw(s, SHARDS).thaw_after is None for s in SEEDS} == {True, False}
    emulators.emulators()  # this process's, which the quick form uses rather than start two
    stdout = run_quick(BENCH / "chaos.py", tmp_path)  # exit status 0: every seed kept them
    print(stdout)
    seeds = {int(m["seed"]): m for m in SEED_LINE.finditer(stdout)}
    assert set(seeds) == set(SEEDS), stdout
    for seed, line in seeds.items():
        assert line["verdict"] == "ok", f"seed {seed}: {line.group(0)}"
        assert int(line["faults"]) > 0, f"seed {seed}: no call failed, the plan proved nothing"


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
