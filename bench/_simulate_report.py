"""The tables and plots of ``simulate.py``, from the summaries of its simulated runs."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from runner.sim.store import GCS_LIST_PAGE

Summary = dict[str, Any]  # one simulated run, as ``simulate.summarize`` makes it
PRICED_TYPE = "e2-standard-2"  # the deployment's default machine type, at list prices


def report(results: list[Summary], footer: str) -> list[str]:
    """Every table, as the lines of ``results.md``."""
    cost = next(s for s in results if "cpu" in s)
    return [
        "## Scenarios (policy after this change)",
        "",
        *main_table(results),
        "",
        "## The scale policy, before and after",
        "",
        *policy_table(results),
        "",
        f"## Runner cost at {cost['vms']:,} VMs",
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
        footer,
    ]


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
        f"| GCS list pages of a full pass at the end (1,000 objects a page) | {pages:,.0f} |",
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
