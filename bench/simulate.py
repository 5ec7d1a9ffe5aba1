"""Simulate CFlow at 125 to 2,000 Spot VMs: the scenarios of issue 5, a table and plots.

    .venv/bin/python bench/simulate.py                       # every scenario, minutes on 2 cores
    .venv/bin/python bench/simulate.py --scale 5 --seeds 10  # a fifth of the scale, to try a change
    .venv/bin/python bench/simulate.py --quick               # tiny, seconds: does it still run

Each run drives the runner's own ``Watcher`` and scale policy and the worker agent's own claim,
commit, retry and preemption code against a simulated Spot fleet, Pub/Sub and bucket on virtual
time (:mod:`runner.sim`). Writes ``bench/out/results.md`` (the tables), ``results.json`` and the
PNG plots (``--quick``: into a temporary folder); ``--publish`` also copies the plots to
``bench/plots/``. Exits 1 if any run lost a shard, committed one twice or left a VM behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from _common import parse_args
from _simulate_report import PRICED_TYPE, Summary, plots, report

import runner.engine.watch
from runner.engine.fleet import Instance
from runner.engine.policy import ScaleDecision, decide_scale
from runner.observe.prices import load_prices
from runner.sim import Result, Scenario, VmModel, Workload, simulate
from runner.sim.ledger import Fate

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
PLOTS = HERE / "plots"


def baseline_decide_scale(
    *,
    outstanding: int,
    max_workers: int,
    slots: int,
    instances: list[Instance],
    idle: set[str],
    busy: set[str],
    stale: set[str] | frozenset[str] = frozenset(),
    spoken_for: set[str] | frozenset[str] = frozenset(),
    elsewhere: set[str] | frozenset[str] = frozenset(),
    publishing: bool = False,  # the policy then had no streams: not read
) -> ScaleDecision:
    """The scale policy before the simulation (runner/engine/policy.py at 7339b91), for "before"
    runs.

    It predates stale workers, the VMs other runs asked for and the workers busy with other
    runs (``stale``, ``spoken_for`` and ``elsewhere``, taken so the watcher can call either
    policy): a frozen worker counts as live capacity here, as it did then.
    """
    del stale, spoken_for, elsewhere
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


POLICIES: dict[str, Callable[..., ScaleDecision]] = {
    "before": baseline_decide_scale,
    "after": decide_scale,
}


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """Run the watcher with the named scale policy."""
    saved = runner.engine.watch.decide_scale
    runner.engine.watch.decide_scale = POLICIES[name]
    try:
        yield
    finally:
        runner.engine.watch.decide_scale = saved


@dataclass(frozen=True)
class Job:
    group: str  # the table row the run belongs to
    scenario: Scenario
    policy: str = "after"
    shape: bool = False  # keep the samples for a plot
    runner_cost: bool = False  # keep the per-poll costs


def summarize(job: Job, r: Result) -> Summary:
    f = r.fates
    s: Summary = {
        "group": job.group,
        "policy": job.policy,
        "seed": job.scenario.seed,
        "shards": r.shards,
        "vms": job.scenario.max_workers,
        "makespan": r.makespan,
        "lower_bound": r.lower_bound,
        "ratio": r.ratio,
        "redo_ratio": r.makespan / r.redo_bound,
        "billed_vm_h": r.billed / 3600,
        "efficiency": r.efficiency,
        "useful": r.useful / r.billed,
        "idle_after_drain": r.idle_fraction,
        "zero_at": r.zero_at,
        "committed": r.committed,
        "failed": r.failed,
        "lost": len(r.lost),
        "double_commits": len(r.double_commits),
        "redone": f[Fate.PREEMPTED.value] + f[Fate.LOST.value],
        "discarded": f[Fate.DISCARDED.value],
        "preemptions": r.fleet["preempted"],
        "vms_created": r.fleet["created"],
        "boot_failed": r.fleet.get("boot_failed", 0),
        "quota_blocked": r.fleet.get("quota_blocked", 0),
        "peak_vms": max((x.vms for x in r.samples), default=0),
        "left_behind": sum(1 for v in r.ledger.vms if v.gone is None),
        "fallback": job.scenario.fallback,
        "fell_back": r.fallback_reason is not None,
        "spot_vm_h": r.spot_billed / 3600,
        "standard_vm_h": r.standard_billed / 3600,
        "standard_shards": r.standard_shards,
        "cost": _cost(r),
        "wall": r.wall_seconds,
    }
    if job.shape:
        s["samples"] = [(x.t, x.vms, x.busy, x.backlog) for x in r.samples if x.t <= r.zero_at]
    if job.runner_cost and r.meter is not None:
        m = r.meter
        s |= {
            "cpu": m.cpu,
            "cpu_at": m.cpu_at,
            "peak": m.peak_bytes,
            "polls": r.polls,
            "lists": r.store_lists,
            "keys_listed": r.store_keys_listed,
            "objects": r.store_objects,
            "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return s


def _cost(r: Result) -> float:
    """USD at list prices: Spot VM-seconds at the Spot rate, the fallback's at the standard one."""
    price = load_prices().lookup(PRICED_TYPE)
    assert price is not None
    return (r.spot_billed * price.spot + r.standard_billed * price.standard) / 3600


def run_job(job: Job) -> Summary:
    logging.getLogger("cflow.runner").setLevel(logging.ERROR)  # the fallback's notice, per run
    with policy(job.policy):
        return summarize(job, simulate(job.scenario))


def jobs(scale: int, seeds: int, vms: int = 125) -> list[Job]:
    """Every run to simulate. The founding case (scenarios 1, 2, 6 and 7) has ``vms`` shards and
    VMs; the large scenarios (3, 4, 5) are divided by ``scale``; ``seeds`` runs of each preemption
    rate, a third as many of scenarios 6 and 7, up to 10 of the founding case and 3 of the long
    tail. The full form is 125 VMs, scale 1 and 30 seeds."""
    few = max(1, seeds // 3)
    founding = Workload(vms, 403.0, sigma=0.05)  # at 125: 14 h of work in shards of ~6.7 min
    lognormal = Workload(10_000 // scale, 30.0, sigma=1.0)
    short = Workload(100_000 // scale, 10.0, sigma=0.5)
    out = [
        Job("4 scale", Scenario("4", short, 2000 // scale, trace_every=7), runner_cost=True),
    ]
    for pol in ("before", "after"):
        for seed in range(min(10, seeds)):
            out.append(Job("1 founding", Scenario("1", founding, vms, seed=seed), pol, seed == 0))
        for rate, group in ((0.05, "2 preempt 5%"), (0.20, "2 preempt 20%")):
            vm = VmModel(preempt_per_hour=rate)
            for seed in range(seeds):
                sc = Scenario("2", founding, vms, vm=vm, seed=seed)
                out.append(Job(group, sc, pol, shape=seed == 1 and rate == 0.2))
        out.append(Job("3 lognormal", Scenario("3", lognormal, 500 // scale), pol, shape=True))
    for sigma in (0.5, 0.75):  # the same 20 shards per VM at a fifth of the scale
        sc = Scenario("3", replace(lognormal, shards=2000 // scale, sigma=sigma), 100 // scale)
        out.append(Job(f"3 sigma {sigma}", sc))
    out += _trouble(founding, few) + _tail(scale, min(3, seeds))
    return out


def _trouble(founding: Workload, seeds: int) -> list[Job]:
    """Issue 8: VMs whose boot fails (they report, are removed and replaced) and a group held to
    fewer VMs than asked for by the region's CPU quota. Issue 12: ``--fallback standard``, with
    and without, where Spot goes wrong: heavy preemption, and Spot capacity (or its quota) for a
    third of the VMs."""
    out = []
    vms = founding.shards
    half, third = 60 * vms // 125, 40 * vms // 125  # at 125 VMs: 60 and 40
    trouble = {
        "6 failed boots 20%": VmModel(boot_fail_rate=0.2),
        f"6 quota {half} of {vms} VMs": VmModel(quota_vms=half),
        "6 both": VmModel(boot_fail_rate=0.2, quota_vms=half),
    }
    for group, vm in trouble.items():
        for seed in range(seeds):
            out.append(Job(group, Scenario("6", founding, vms, vm=vm, seed=seed)))
    spot_trouble = {
        "7 preempt 2/h": VmModel(preempt_per_hour=2.0),
        "7 preempt 4/h": VmModel(preempt_per_hour=4.0),
        f"7 Spot for {third} of {vms} VMs": VmModel(quota_vms=third, preempt_per_hour=0.05),
        "7 preempt 5%/h (Spot fine)": VmModel(preempt_per_hour=0.05),
    }
    for group, vm in spot_trouble.items():
        for seed in range(seeds):
            for fb in (False, True):
                sc = Scenario("7", founding, vms, vm=vm, seed=seed, fallback=fb)
                out.append(Job(group, sc))
    return out


def _tail(scale: int, seeds: int) -> list[Job]:
    """Scenario 5: a slow 1%, the machines' (stragglers) or the shards' own (data skew), with
    and without ``--speculate``."""
    out = []
    tail = {"median_seconds": 60.0, "sigma": 0.3, "tail_fraction": 0.01, "tail_factor": 20.0}
    for kind, per_attempt in (("stragglers", True), ("data skew", False)):
        work = Workload(2000 // scale, tail_per_attempt=per_attempt, **tail)
        for spec in (False, True):
            for seed in range(seeds):
                sc = Scenario("5", work, 200 // scale, speculate=spec, seed=seed)
                group = f"5 {kind}" + (" +speculate" if spec else "")
                out.append(Job(group, sc, shape=seed == 0 and per_attempt))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="divide the large scenarios by this")
    parser.add_argument("--seeds", type=int, default=30, help="runs per preemption scenario")
    parser.add_argument("--vms", type=int, default=125, help="the founding case's shards and VMs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--out", type=Path, default=OUT, help="where the tables and plots go")
    parser.add_argument("--publish", action="store_true", help="copy the plots to bench/plots/")
    args = parse_args(parser, argv, vms=10, scale=100, seeds=1, out=None)
    if args.out is not None:
        return _main(args)
    with tempfile.TemporaryDirectory(prefix="cflow-sim-") as tmp:  # --quick keeps bench/out
        args.out = Path(tmp)
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = jobs(args.scale, args.seeds, args.vms)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_job, todo))
    wall = time.perf_counter() - started
    footer = f"{len(todo)} simulated runs in {wall:.0f} s of wall time ({args.jobs} processes)."
    lines = report(results, footer)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in s.items() if k not in ("samples", "cpu", "cpu_at")} for s in results]
    (args.out / "results.json").write_text(json.dumps(slim, indent=1))
    written = plots(results, args.out)
    if args.publish:
        PLOTS.mkdir(exist_ok=True)
        for path in written:
            shutil.copy(path, PLOTS / path.name)
    print("\n".join(lines))
    bad = sum(s["lost"] + s["double_commits"] + s["left_behind"] for s in results)
    print(f"plots: {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
