"""A chaos soak on the Google Cloud path: many seeds of whole runs, one line each and a summary.

    python bench/chaos.py [--seeds 50] [--first 1] [--seed N ...] [--at-once] [--rate 0.02]
                          [--shards 6] [--kinds 5xx,reset,...] [--quick]

Each seed is one scenario of ``tests/gcp/chaos.py`` on the Pub/Sub emulator, fake-gcs-server and
the fake Compute API with real ``python -m worker --backend gcp`` processes as VMs: two runs at
once (one shaped with the standard-VM fallback), faults on the calls (a ``FaultPlan`` of
``--rate`` drawn from the seed), a Spot preemption, one runner killed and resumed with ``runner
watch``, a VM frozen and thawed or never. Per seed it checks that every shard committed exactly
once, that both runs finished (failed only where a shard was made to fail), that no VM was left,
and that no VM idled past the harness's bound; and it prints the VM-seconds spent idle, from the
VMs' lifetimes and the attempts' times. ``--seed N`` reruns one seed alone (``--seed N M``, a
few); ``--at-once`` runs the seeds side by side, one thread each. Exit status 1 when a seed found
a problem (its folder is kept and printed), 77 without the emulators.

The quick form is the soak's short form, the one ``tests/gcp/test_chaos.py`` runs: seeds
:data:`QUICK_SEEDS` at once, 4 shards a run. Together they preempt with notice (the fallback),
kill and resume each run's runner, freeze a VM for good and thaw one, and fail a shard on
purpose. Left out: a VM frozen for good while its own run's runner is down. The resumed
``runner watch`` never hears from it, so it never takes it for frozen, and the VM stays
(``--seed 3``).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from _common import REPO, compile_project, parse_args, start_emulators

sys.path.insert(0, str(REPO))  # the harness, the emulators and the fake Compute API: tests/

from tests.gcp.chaos import IDLE_BOUND, SeedResult, run_seed

QUICK_SEEDS = [10, 13]

HEADER = (
    f"{'seed':>5} {'s':>6} {'VMs':>4} {'VM-s':>6} {'busy':>6} {'idle':>6} {'idle%':>6} "
    f"{'max idle':>8} {'faults':>6} {'tries':>5}  result"
)


def _line(r: SeedResult) -> str:
    share = 100 * r.idle_seconds / r.vm_seconds if r.vm_seconds else 0.0
    verdict = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
    return (
        f"{r.seed:>5} {r.seconds:>6.1f} {r.vms:>4} {r.vm_seconds:>6.0f} {r.busy_seconds:>6.0f} "
        f"{r.idle_seconds:>6.0f} {share:>6.1f} {r.max_idle:>8.1f} {r.faults:>6} {r.attempts:>5}"
        f"  {verdict}  [{r.plan.describe()}]"
    )


def _summary(results: list[SeedResult], rate: float) -> None:
    failed = [r.seed for r in results if not r.ok]
    print(f"\n{len(results)} seeds at fault rate {rate}: {len(results) - len(failed)} ok", end="")
    print(f", failed: {' '.join(map(str, failed))}" if failed else "")
    rows = {
        "seconds per seed": [r.seconds for r in results],
        "VMs started per seed": [float(r.vms) for r in results],
        "VM-seconds per seed": [r.vm_seconds for r in results],
        "idle VM-seconds per seed": [r.idle_seconds for r in results],
        "idle share of VM-seconds, %": [
            100 * r.idle_seconds / r.vm_seconds for r in results if r.vm_seconds
        ],
        f"most idle seconds of one VM (bound {IDLE_BOUND:.0f})": [r.max_idle for r in results],
        "faults injected per seed": [float(r.faults) for r in results],
        "attempts per seed": [float(r.attempts) for r in results],
    }
    print(f"\n{'figure':<48}{'median':>9}{'p90':>9}{'max':>9}{'total':>10}")
    for name, values in rows.items():
        if not values:
            continue
        ordered = sorted(values)
        p90 = ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]
        total = f"{sum(values):>10.0f}" if "%" not in name and "most" not in name else ""
        print(f"{name:<48}{statistics.median(values):>9.1f}{p90:>9.1f}{ordered[-1]:>9.1f}{total}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=50, help="how many seeds, from --first")
    parser.add_argument("--first", type=int, default=1, help="the first seed")
    parser.add_argument(
        "--seed", type=int, nargs="+", default=None, help="run these seeds alone (one, or a few)"
    )
    parser.add_argument(
        "--at-once", action="store_true", help="run the seeds side by side, one thread each"
    )
    parser.add_argument("--rate", type=float, default=0.02, help="each call's fault probability")
    parser.add_argument("--shards", type=int, default=6, help="shards per run")
    parser.add_argument(
        "--kinds",
        default=None,
        help="only these faults, comma-separated (tests/gcp/faults.py names them); default: all",
    )
    args = parse_args(parser, argv, seed=QUICK_SEEDS, at_once=True, shards=4)
    seeds = args.seed if args.seed is not None else list(range(args.first, args.first + args.seeds))
    kinds = args.kinds.split(",") if args.kinds else None
    compile_project()
    emus = start_emulators(reuse=args.quick)
    results: list[SeedResult] = []
    printing = threading.Lock()

    def one(seed: int) -> None:
        work = Path(tempfile.mkdtemp(prefix=f"cflow-chaos-{seed}-"))
        result = run_seed(seed, work, shards=args.shards, rate=args.rate, kinds=kinds)
        with printing:
            results.append(result)
            print(_line(result), flush=True)
            if result.ok:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"      kept {work}", flush=True)

    try:
        print(HEADER, flush=True)
        if args.at_once:
            threads = [threading.Thread(target=one, args=(seed,)) for seed in seeds]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        else:
            for seed in seeds:
                one(seed)
    finally:
        emus.stop()
    _summary(results, args.rate)
    if len(results) < len(seeds) or any(not r.ok for r in results):  # a seed that crashed, too
        sys.exit(1)


if __name__ == "__main__":
    main()
