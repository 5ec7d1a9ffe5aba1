"""Simulate CFlow at 125 to 2,000 Spot VMs: the scenarios of issue 5, a table and plots.

    .venv/bin/python bench/simulate.py              # every scenario, a few minutes on 2 cores
    .venv/bin/python bench/simulate.py --quick      # smaller runs, to try a change

Each run drives the runner's own ``Watcher`` and scale policy and the worker agent's own claim,
commit, retry and preemption code against a simulated Spot fleet, Pub/Sub and bucket on virtual
time (:mod:`runner.sim`). Writes ``bench/out/results.md`` (the tables), ``results.json`` and the
PNG plots; ``--publish`` also copies the plots to ``bench/plots/``.
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
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import runner.engine.watch
from runner.engine.fleet import Instance
from runner.engine.policy import ScaleDecision, decide_scale
from runner.observe.prices import load_prices
from runner.sim import Result, Scenario, VmModel, Workload, simulate
from runner.sim.ledger import Fate
from runner.sim.store import GCS_LIST_PAGE

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
PLOTS = HERE / "plots"
Summary = dict[str, Any]


def baseline_decide_scale(
    *,
    outstanding: int,
    max_workers: int,
    slots: int,
    instances: list[Instance],
    idle: set[str],
    busy: set[str],
    stale: set[str] | frozenset[str] = frozenset(),
) -> ScaleDecision:
    """The scale policy before the simulation (runner/engine/policy.py at 7339b91), for "before"
    runs.

    It predates stale workers (``stale``, taken so the watcher can call either policy): a frozen
    worker counts as live capacity here, as it did then.
    """
    del stale
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


PRICED_TYPE = "e2-standard-2"  # the deployment's default machine type, at list prices


def _cost(r: Result) -> float:
    """USD at list prices: Spot VM-seconds at the Spot rate, the fallback's at the standard one."""
    price = load_prices().lookup(PRICED_TYPE)
    assert price is not None
    return (r.spot_billed * price.spot + r.standard_billed * price.standard) / 3600


def run_job(job: Job) -> Summary:
    logging.getLogger("cflow.runner").setLevel(logging.ERROR)  # the fallback's notice, per run
    with policy(job.policy):
        return summarize(job, simulate(job.scenario))


def jobs(quick: bool) -> list[Job]:
    scale = 5 if quick else 1
    seeds = 10 if quick else 30
    founding = Workload(125, 403.0, sigma=0.05)  # 14 h of work in 125 shards of ~6.7 min
    lognormal = Workload(10_000 // scale, 30.0, sigma=1.0)
    short = Workload(100_000 // scale, 10.0, sigma=0.5)
    tail = {"median_seconds": 60.0, "sigma": 0.3, "tail_fraction": 0.01, "tail_factor": 20.0}
    out = [
        Job("4 scale", Scenario("4", short, 2000 // scale, trace_every=7), runner_cost=True),
    ]
    for pol in ("before", "after"):
        for seed in range(10):
            out.append(Job("1 founding", Scenario("1", founding, 125, seed=seed), pol, seed == 0))
        for rate, group in ((0.05, "2 preempt 5%"), (0.20, "2 preempt 20%")):
            vm = VmModel(preempt_per_hour=rate)
            for seed in range(seeds):
                sc = Scenario("2", founding, 125, vm=vm, seed=seed)
                out.append(Job(group, sc, pol, shape=seed == 1 and rate == 0.2))
        out.append(Job("3 lognormal", Scenario("3", lognormal, 500 // scale), pol, shape=True))
    for sigma in (0.5, 0.75):  # the same 20 shards per VM at a fifth of the scale
        sc = Scenario("3", replace(lognormal, shards=2000, sigma=sigma), 100)
        out.append(Job(f"3 sigma {sigma}", sc))
    # Issue 8: VMs whose boot fails (they report, are removed and replaced) and a group held to
    # fewer VMs than asked for by the region's CPU quota.
    trouble = {
        "6 failed boots 20%": VmModel(boot_fail_rate=0.2),
        "6 quota 60 of 125 VMs": VmModel(quota_vms=60),
        "6 both": VmModel(boot_fail_rate=0.2, quota_vms=60),
    }
    for group, vm in trouble.items():
        for seed in range(seeds // 3):
            out.append(Job(group, Scenario("6", founding, 125, vm=vm, seed=seed)))
    # Issue 12: --fallback standard, with and without, where Spot goes wrong: heavy preemption,
    # and Spot capacity (or its quota) for a third of the VMs.
    spot_trouble = {
        "7 preempt 2/h": VmModel(preempt_per_hour=2.0),
        "7 preempt 4/h": VmModel(preempt_per_hour=4.0),
        "7 Spot for 40 of 125 VMs": VmModel(quota_vms=40, preempt_per_hour=0.05),
        "7 preempt 5%/h (Spot fine)": VmModel(preempt_per_hour=0.05),
    }
    for group, vm in spot_trouble.items():
        for seed in range(seeds // 3):
            for fb in (False, True):
                sc = Scenario("7", founding, 125, vm=vm, seed=seed, fallback=fb)
                out.append(Job(group, sc))
    for kind, per_attempt in (("stragglers", True), ("data skew", False)):
        work = Workload(2000, tail_per_attempt=per_attempt, **tail)
        for spec in (False, True):
            for seed in range(3 if not quick else 2):
                sc = Scenario("5", work, 200, speculate=spec, seed=seed)
                group = f"5 {kind}" + (" +speculate" if spec else "")
                out.append(Job(group, sc, shape=seed == 0 and per_attempt))
    return out


# -- tables -------------------------------------------------------------------------------------


def _groups(results: list[Summary], pol: str = "after") -> dict[str, list[Summary]]:
    out: dict[str, list[Summary]] = {}
    for s in results:
        if s["policy"] == pol:
            out.setdefault(s["group"], []).append(s)
    return out


def _mean(rows: list[Summary], key: str) -> float:
    return statistics.mean(r[key] for r in rows)


def _ratios(rows: list[Summary]) -> str:
    rs = sorted(r["ratio"] for r in rows)
    if len(rs) == 1:
        return f"{rs[0]:.2f}"
    p90 = rs[min(len(rs) - 1, int(0.9 * len(rs)))]
    return f"{statistics.median(rs):.2f} / {statistics.mean(rs):.2f} / {p90:.2f} / {rs[-1]:.2f}"


def main_table(results: list[Summary]) -> list[str]:
    lines = [
        "| scenario | shards x VMs | runs | makespan s (mean) | lower bound s | makespan / bound"
        " (median / mean / p90 / max) | ... / redo bound (mean / max) | billed VM-h"
        " | task work % | idle after drain % | attempts redone | failed | lost | double commits |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group, rows in _groups(results).items():
        redo = [r["redo_ratio"] for r in rows]
        lines.append(
            f"| {group} | {rows[0]['shards']:,} x {rows[0]['vms']:,} | {len(rows)}"
            f" | {_mean(rows, 'makespan'):.0f} | {_mean(rows, 'lower_bound'):.0f}"
            f" | {_ratios(rows)} | {statistics.mean(redo):.2f} / {max(redo):.2f}"
            f" | {_mean(rows, 'billed_vm_h'):.1f} | {100 * _mean(rows, 'efficiency'):.1f}"
            f" | {100 * _mean(rows, 'idle_after_drain'):.2f} | {sum(r['redone'] for r in rows)}"
            f" | {sum(r['failed'] for r in rows)} | {sum(r['lost'] for r in rows)}"
            f" | {sum(r['double_commits'] for r in rows)} |"
        )
    return lines


def policy_table(results: list[Summary]) -> list[str]:
    before, after = _groups(results, "before"), _groups(results, "after")
    lines = [
        "| scenario | policy | makespan / bound (median / mean / p90 / max) | billed VM-h"
        " | VMs created | idle after drain % |",
        "|---|---|---|---|---|---|",
    ]
    for group in before:
        for name, rows in (("before", before[group]), ("after", after[group])):
            lines.append(
                f"| {group} | {name} | {_ratios(rows)} | {_mean(rows, 'billed_vm_h'):.2f}"
                f" | {_mean(rows, 'vms_created'):.1f}"
                f" | {100 * _mean(rows, 'idle_after_drain'):.2f} |"
            )
    return lines


def trouble_table(results: list[Summary]) -> list[str]:
    """Failed boots and quota: slower, but nothing lost and no VM left behind."""
    groups = _groups(results)
    founding = groups.get("1 founding", [])
    lines = [
        "| scenario | runs | makespan s (mean) | vs. founding | peak VMs billed | failed boots"
        " | VMs blocked by quota | committed | lost | VMs left behind |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = _mean(founding, "makespan") if founding else float("nan")
    for group, rows in groups.items():
        if group.startswith(("1", "6")):
            lines.append(
                f"| {group} | {len(rows)} | {_mean(rows, 'makespan'):.0f}"
                f" | {_mean(rows, 'makespan') / base:.2f}x | {max(r['peak_vms'] for r in rows)}"
                f" | {sum(r['boot_failed'] for r in rows)}"
                f" | {sum(r['quota_blocked'] for r in rows)}"
                f" | {sum(r['committed'] for r in rows):,} of {sum(r['shards'] for r in rows):,}"
                f" | {sum(r['lost'] for r in rows)} | {sum(r['left_behind'] for r in rows)} |"
            )
    return lines


def fallback_table(results: list[Summary]) -> list[str]:
    """--fallback standard: makespan and list-price cost, without and with, per scenario."""
    lines = [
        "| scenario | runs | fallback | makespan s (mean) | p90 | fell back | shards on standard"
        " (mean) | Spot VM-h | standard VM-h | cost USD (mean) | lost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for group, rows in _groups(results).items():
        if not group.startswith("7"):
            continue
        for fb in (False, True):
            sel = [r for r in rows if r["fallback"] is fb]
            spans = sorted(r["makespan"] for r in sel)
            p90 = spans[min(len(spans) - 1, int(0.9 * len(spans)))]
            lines.append(
                f"| {group} | {len(sel)} | {'standard' if fb else 'none'}"
                f" | {_mean(sel, 'makespan'):.0f} | {p90:.0f}"
                f" | {sum(r['fell_back'] for r in sel)} | {_mean(sel, 'standard_shards'):.1f}"
                f" | {_mean(sel, 'spot_vm_h'):.1f} | {_mean(sel, 'standard_vm_h'):.1f}"
                f" | {_mean(sel, 'cost'):.2f} | {sum(r['lost'] for r in sel)} |"
            )
    return lines


def cost_table(s: Summary) -> list[str]:
    cpu = sorted(s["cpu"])
    run = s["makespan"]
    share = statistics.mean(cpu) * s["polls"] / run  # traced polls are left out of ``cpu``
    reconciles = s["lists"] / 2  # committed() and failed(): two listings per reconcile
    pages = 2 * s["objects"] / GCS_LIST_PAGE
    return [
        "| measure | value |",
        "|---|---|",
        f"| polls of the watch loop (every 0.25 s of a {run:.0f} s run) | {s['polls']:,} |",
        f"| runner CPU per poll: median / p99 / max | {1e3 * statistics.median(cpu):.1f} ms"
        f" / {1e3 * cpu[int(0.99 * len(cpu))]:.0f} ms / {1e3 * cpu[-1]:.0f} ms |",
        f"| runner CPU over the run | {share * run:.0f} s ({100 * share:.1f}% of one core) |",
        f"| memory allocated within one poll (tracemalloc, every 7th poll): median / max | "
        f"{statistics.median(s['peak']) / 1e6:.2f} MB / {max(s['peak']) / 1e6:.1f} MB |",
        f"| store listings (2 per reconcile, every 5 s) | {s['lists']:,} ({reconciles:.0f}"
        " reconciles) |",
        f"| objects walked per listing: mean / at the end | "
        f"{s['keys_listed'] / max(s['lists'], 1):,.0f} / {s['objects']:,} |",
        f"| GCS list pages per reconcile at the end (1,000 objects a page) | {pages:,.0f} |",
        f"| simulator process max RSS (runner and simulated fleet) | {s['maxrss_mb']:.0f} MB |",
    ]


def tail_table(results: list[Summary]) -> list[str]:
    lines = [
        "| long tail (1% x20) | makespan s | makespan / bound | billed VM-h | useful work %"
        " | attempts stopped or discarded |",
        "|---|---|---|---|---|---|",
    ]
    for group, rows in _groups(results).items():
        if group.startswith("5"):
            lines.append(
                f"| {group[2:]} | {_mean(rows, 'makespan'):.0f} | {_ratios(rows)}"
                f" | {_mean(rows, 'billed_vm_h'):.1f} | {100 * _mean(rows, 'useful'):.1f}"
                f" | {_mean(rows, 'redone') + _mean(rows, 'discarded'):.1f} |"
            )
    return lines


# -- plots --------------------------------------------------------------------------------------


def plots(results: list[Summary], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    shapes = [s for s in results if "samples" in s and s["policy"] == "after"]
    fig, axes = plt.subplots(len(shapes), 1, figsize=(9, 2.6 * len(shapes)))
    xmax: dict[str, float] = {}  # one time axis per scenario, so with and without compare
    for s in shapes:
        xmax[s["group"][0]] = max(xmax.get(s["group"][0], 0.0), s["samples"][-1][0])
    for ax, s in zip(axes, shapes, strict=True):
        ax.set_xlim(0, xmax[s["group"][0]] * 1.02)
        t, vms, busy, backlog = zip(*s["samples"], strict=True)
        ax.plot(t, vms, label="running VMs (billed)", color="tab:blue")
        ax.plot(t, busy, label="busy VMs", color="tab:green")
        ax.set_ylabel("VMs")
        ax2 = ax.twinx()
        ax2.plot(t, backlog, label="queued shards", color="tab:orange", linestyle="--")
        ax2.set_ylabel("queued shards")
        ax.set_title(f"{s['group']} (seed {s['seed']}): makespan {s['makespan']:.0f} s", loc="left")
        ax.legend(loc="upper right", fontsize=7)
        ax2.legend(loc="center right", fontsize=7)
    axes[-1].set_xlabel("seconds since submit")
    fig.tight_layout()
    written.append(_save(fig, out / "shapes.png"))

    fig, ax = plt.subplots(figsize=(8, 3.2))
    groups = [g for g in _groups(results, "before") if g.startswith("2")]
    data, labels = [], []
    for g in groups:
        for pol in ("before", "after"):
            data.append([s["ratio"] for s in _groups(results, pol)[g]])
            labels.append(f"{g[2:]}\n{pol}")
    ax.boxplot(data, tick_labels=labels, whis=(10, 90))
    ax.axhline(1.3, color="tab:red", linestyle=":", label="target at 5%: 1.3x")
    ax.set_ylabel("makespan / lower bound")
    ax.set_title(f"Founding case under Spot preemption, {len(data[0])} seeds each", loc="left")
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / "preemption.png"))

    cost = next(s for s in results if "cpu" in s)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.scatter(cost["cpu_at"], [1e3 * c for c in cost["cpu"]], s=3)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since submit")
    ax.set_ylabel("runner CPU per poll (ms)")
    ax.set_title(
        f"Runner cost per poll, {cost['vms']:,} VMs x {cost['shards']:,} shards"
        " (spikes: store reconcile every 5 s)",
        loc="left",
    )
    fig.tight_layout()
    written.append(_save(fig, out / "runner_cost.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller runs, fewer seeds")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--publish", action="store_true", help="copy the plots to bench/plots/")
    args = parser.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()
    todo = jobs(args.quick)
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run_job, todo))
    wall = time.perf_counter() - started
    cost = next(s for s in results if "cpu" in s)
    lines = [
        "## Scenarios (policy after this change)",
        "",
        *main_table(results),
        "",
        "## The scale policy, before and after",
        "",
        *policy_table(results),
        "",
        "## Runner cost at 2,000 VMs",
        "",
        *cost_table(cost),
        "",
        "## Long tail and speculation",
        "",
        *tail_table(results),
        "",
        "## Failed boots and a quota-limited group",
        "",
        *trouble_table(results),
        "",
        f"## Standard-VM fallback ({PRICED_TYPE}, list prices)",
        "",
        *fallback_table(results),
        "",
        f"{len(todo)} simulated runs in {wall:.0f} s of wall time ({args.jobs} processes).",
    ]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    slim = [{k: v for k, v in s.items() if k not in ("samples", "cpu", "cpu_at")} for s in results]
    (OUT / "results.json").write_text(json.dumps(slim, indent=1))
    written = plots(results, OUT)
    if args.publish:
        PLOTS.mkdir(exist_ok=True)
        for path in written:
            shutil.copy(path, PLOTS / path.name)
    print("\n".join(lines))
    bad = sum(s["lost"] + s["double_commits"] + s["left_behind"] for s in results)
    print(f"plots: {', '.join(str(p.relative_to(HERE.parent)) for p in written)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
