"""A chaos soak on the Google Cloud path: whole runs, every kind of failure at once, one seed each.

One seed is one scenario on a fresh deployment of the emulators (Pub/Sub, fake-gcs-server) and a
fake Compute API whose VMs are real ``python -m worker --backend gcp`` processes. Two runs go at
once through the ``runner`` CLI: a plain one on the deployment's group, and a shaped one with the
standard-VM fallback (``--fallback standard --fallback-after 1``). While they run, the seed's
:class:`Plan` decides what goes wrong:

- a faulty cloud: a fault plan (``tests/gcp/faults.py``, of the seed) makes the runners' and the
  workers' calls fail as the real services do, in the fake Compute API and in the proxies in
  front of both emulators (``tests/gcp/fault_proxies.py``);
- a Spot preemption of a VM busy with the shaped run (SIGTERM, or SIGKILL: a VM that vanishes);
  the group recreates it, and the fallback pins the shard to standard VMs;
- one runner killed (SIGKILL) mid-run and resumed with ``runner watch RUN``;
- a VM busy with the plain run frozen (SIGSTOP), thawed later or never; a frozen VM that is
  deleted is stopped hard after :data:`HARD_STOP` seconds, as Compute Engine stops a guest that
  ignores its shutdown;
- maybe a shard of the plain run that always fails (that run must then end failed, alone).

Then it checks what the product promises: every shard committed exactly once (the commit records
in the bucket: one ``result.json`` per shard, its attempt not recorded discarded or failed, no
other attempt recorded succeeded, each index once in the combined output), every run finished,
no VM left in any group, and the VM-seconds spent idle (a VM's lifetimes, from its process's
start to its exit, less its attempts' times) within :data:`IDLE_BOUND` per VM. Everything is
drawn from the seed, so ``bench/chaos.py --seed N`` reruns one alone. The checks and the
measuring are in :mod:`tests.gcp.chaos_checks`. ``tests/gcp/test_chaos.py``
runs a few seeds; ``bench/chaos.py`` runs many and prints the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests import emulators
from tests.gcp.chaos_checks import Lifetimes, SeedResult, check_run, drained, measure
from tests.gcp.conftest import shaped_worker_spawner, worker_env, worker_spawner
from tests.gcp.fake_compute import FakeCompute
from tests.gcp.fault_proxies import FaultProxies
from tests.gcp.faults import GCS_KINDS, PUBSUB_KINDS, FaultPlan
from worker.backends.gcp.gcs import GcsStore
from worker.protocol import Layout

ZONE, GROUP = "us-central1-a", "cflow-workers"
LEASE, HEARTBEAT = 10.0, 2.0  # seconds, for the workers and the runners alike
IDLE_TIMEOUT = 5.0  # seconds an idle worker waits before it deletes its own VM
HARD_STOP = 2.0  # seconds a deleted VM that ignores its shutdown runs before it is stopped
# Idle seconds one VM may spend, at most: its boot, a lease lapsing under it, its idle timeout
# and the runner's look before it lets the VM go. A VM that outlives its work by the drain
# window below (a leak) breaks it.
IDLE_BOUND = IDLE_TIMEOUT + LEASE + 30.0
DRAIN_WINDOW = 2 * IDLE_BOUND  # seconds the groups get to reach zero after both runs ended
RUN_LIMIT = 300.0  # seconds both runs get to end, chaos and all
RUNS = ("plain", "shaped")

TASK = """
import os, time
from pathlib import Path

def run(shard):
    mark = Path(os.environ["MARK_DIR"]) / f"{RUN}.{os.environ['CFLOW_WORKER_NAME']}.{shard.index}"
    mark.touch()  # here while the attempt runs: its VM is busy
    try:
        time.sleep(SECONDS)
        if shard.index == POISON:
            raise RuntimeError("poison shard: always fails")
        (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
    finally:
        mark.unlink(missing_ok=True)
"""


@dataclass(frozen=True)
class Plan:
    """What goes wrong in one seed's scenario, all drawn from the seed."""

    seed: int
    shards: int  # per run
    task_seconds: float
    killed: str  # the run whose runner is killed and resumed
    kill_after: int  # that run's commits before its runner is killed
    hard_preempt: bool  # SIGKILL (the VM vanishes) rather than SIGTERM (Spot's notice)
    thaw_after: float | None  # seconds the frozen VM stays frozen; None: never thawed
    poison: int | None  # a plain-run shard that always fails

    @classmethod
    def draw(cls, seed: int, shards: int) -> Plan:
        rng = random.Random(seed)
        return cls(
            seed=seed,
            shards=shards,
            task_seconds=round(rng.uniform(0.6, 1.5), 2),
            killed=rng.choice(RUNS),
            kill_after=rng.randint(1, max(1, shards // 2)),
            hard_preempt=rng.random() < 0.5,
            thaw_after=None if rng.random() < 0.5 else round(rng.uniform(2.0, 15.0), 1),
            poison=rng.randrange(shards) if rng.random() < 0.3 else None,
        )

    def describe(self) -> str:
        thaw = "never" if self.thaw_after is None else f"{self.thaw_after:g}s"
        return (
            f"kill {self.killed} runner after {self.kill_after}; "
            f"preempt {'SIGKILL' if self.hard_preempt else 'SIGTERM'}; thaw {thaw}; "
            f"poison {'-' if self.poison is None else self.poison}"
        )


class Scenario:
    """One seed's deployment, fake group, two runs and the chaos done to them."""

    def __init__(
        self, plan: Plan, workdir: Path, *, rate: float = 0.0, kinds: Collection[str] | None = None
    ):
        self.plan, self.workdir = plan, workdir
        self.fault_plan = FaultPlan(rate, seed=plan.seed, kinds=kinds)
        emus = emulators.emulators()
        # The runners and the workers reach both emulators through proxies that fail calls as
        # the services do (and hold Cloud Storage's one write a second to an object), unless
        # the plan's faults are the Compute API's alone; the harness reads the emulators.
        self.proxies = None
        if kinds is None or set(kinds) & {*GCS_KINDS, *PUBSUB_KINDS}:
            self.proxies = FaultProxies(emus.gcs_url, emus.pubsub_host, self.fault_plan)
        through = self.proxies.env if self.proxies is not None else {}
        self.d = emulators.new_deployment(ack_deadline=int(LEASE))
        self.marks = workdir / "marks"
        self.marks.mkdir(parents=True)
        self.lifetimes = Lifetimes()
        self.store = GcsStore(self.d.bucket)  # the harness reads the emulator itself, no faults
        self.fake = self._fake(through)
        outputs = workdir / "cflow-outputs.json"
        outputs.write_text(json.dumps(self.d.outputs(zone=ZONE, group=GROUP)))
        self.env = worker_env(
            self.fake.endpoint,
            CFLOW_BACKEND="gcp",
            CFLOW_DEPLOYMENT=str(outputs),
            CFLOW_LEASE_SECONDS=str(LEASE),
            CFLOW_HEARTBEAT_SECONDS=str(HEARTBEAT),
            COLUMNS="200",
            **through,
        )
        self.runners: dict[str, subprocess.Popen[str]] = {}
        self.readers: list[threading.Thread] = []
        self.logs: dict[int, Path] = {}
        self.run_ids: dict[str, str] = {}
        self.frozen: str | None = None
        self.preempted: str | None = None
        self.done: list[str] = []  # the chaos applied, in order
        self._stop = threading.Event()

    def _fake(self, through: dict[str, str]) -> FakeCompute:
        holder: dict[str, str] = {}
        common: dict[str, Any] = {
            "logs": self.workdir / "vms",
            "endpoint": lambda: holder["endpoint"],
            "idle_timeout": IDLE_TIMEOUT,
            "extra_args": ("--lease-seconds", str(LEASE), "--heartbeat", str(HEARTBEAT)),
            "env": {"MARK_DIR": str(self.marks), **through},
        }
        plain = worker_spawner(self.d, group=GROUP, zone=ZONE, **common)
        shaped = shaped_worker_spawner(self.d, zone=ZONE, **common)
        fake = FakeCompute(
            project=self.d.project,
            group=GROUP,
            zone=ZONE,
            spawn=self.lifetimes.wrap(plain),
            shaped_spawn=self.lifetimes.wrap_shaped(shaped),
            metadata={
                "cflow-subscription": self.d.work_subscription,
                "cflow-work-topic": self.d.work_topic,
            },
            faults=self.fault_plan,
        ).start()
        holder["endpoint"] = fake.endpoint
        return fake

    # -- the runs ----------------------------------------------------------------------------

    def _task(self, name: str) -> Path:
        folder = self.workdir / f"task-{name}"
        folder.mkdir()
        poison = self.plan.poison if name == "plain" else None
        body = (
            TASK.replace("RUN", repr(name))
            .replace("POISON", repr(poison))
            .replace("SECONDS", repr(self.plan.task_seconds))
        )
        (folder / "task.py").write_text(body)
        return folder

    def _runner(self, *args: str) -> subprocess.Popen[str]:
        """``runner ARGS``; its narration goes to a file of its own (``log(proc)``)."""
        log = self.workdir / f"runner-{len(self.logs)}.log"
        with log.open("w") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "runner", *args],
                cwd=self.workdir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.logs[proc.pid] = log
        return proc

    def log(self, proc: subprocess.Popen[str]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def submit(self) -> None:
        """Both runs at once: each ``runner submit`` prints its run id first."""
        # No halting: a thawed VM's attempt of the shard made to fail can be the third failure
        # of one reason (the default rule's), which cancels the run; the soak wants it to end.
        shards = (
            *("--shards", str(self.plan.shards), "--workers", "2", "--max-attempts", "2"),
            *("--halt", "never"),
        )
        self.runners["plain"] = self._runner("submit", str(self._task("plain")), *shards)
        self.runners["shaped"] = self._runner(
            *("submit", str(self._task("shaped")), *shards),
            *("--machine-type", "n2-standard-2", "--fallback", "standard", "--fallback-after", "1"),
        )
        # Read as they come: one run may take its first shards while the other's groups are
        # still being made, and the chaos starts with the first.
        self.readers = [
            threading.Thread(target=self._read_id, args=(name, proc), daemon=True)
            for name, proc in self.runners.items()
        ]
        for reader in self.readers:
            reader.start()

    def _read_id(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self.run_ids[name] = proc.stdout.readline().strip()  # "": it ended without a run

    def commits(self, name: str) -> int:
        run = self.run_ids[name]
        return len(list(self.store.list(Layout.shards_prefix(run), suffix="/result.json")))

    # -- the chaos ---------------------------------------------------------------------------

    def _busy(self, run: str, *, exclude: set[str], prefix: str = "") -> str | None:
        """A live VM running a shard of ``run`` now: its mark is there, and younger than the
        task (a VM killed mid-attempt leaves its mark behind)."""
        live = self.fake.live()
        now = time.time()
        for mark in self.marks.glob(f"{run}.*"):
            vm = mark.name.split(".")[1]
            with contextlib.suppress(FileNotFoundError):
                fresh = now - mark.stat().st_mtime < self.plan.task_seconds * 0.8
                if fresh and vm in live and vm not in exclude and vm.startswith(prefix):
                    return vm
        return None

    def _until(self, what: Callable[[], Any], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self._stop.is_set() and time.monotonic() < deadline:
            if found := what():
                return found
            time.sleep(0.1)
        return None

    def preempt(self) -> None:
        """Preempt a Spot VM busy with the shaped run: the fallback pins its shard to standard."""
        vm = self._until(lambda: self._busy("shaped", exclude=set(), prefix=self._spot_base()))
        proc = self.fake.live().get(vm) if vm else None
        if proc is not None:
            proc.send_signal(signal.SIGKILL if self.plan.hard_preempt else signal.SIGTERM)
            self.preempted = vm
            self.done.append(f"preempted {vm}")

    def _spot_base(self) -> str:
        """The name every VM of the shaped run's Spot group starts with ("\0": none yet)."""
        for group in self.fake.made_groups.values():
            template = str(group.get("instanceTemplate", "")).rsplit("/", 1)[-1]
            props = self.fake.templates.get(template, {}).get("properties", {})
            if props.get("scheduling", {}).get("provisioningModel") == "SPOT":
                return f"{group['baseInstanceName']}-"
        return "\0"

    def freeze(self) -> None:
        """Freeze a VM busy with the plain run; thaw it later, or stop it hard once deleted."""
        vm = self._until(lambda: self._busy("plain", exclude={self.preempted or ""}))
        proc = self.fake.live().get(vm) if vm else None
        if proc is None:
            return
        os.kill(proc.pid, signal.SIGSTOP)
        self.frozen = vm
        self.done.append(f"froze {vm}")
        if self.plan.thaw_after is not None:
            self._stop.wait(self.plan.thaw_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            self.done.append(f"thawed {vm}")
            return
        # Never thawed: once its group deletes it, the VM is stopped as Compute Engine stops a
        # guest that does not shut down.
        if self._until(lambda: vm in self.fake.deleted, timeout=600.0):
            self._stop.wait(HARD_STOP)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            self.done.append(f"stopped frozen {vm}")

    def kill_runner(self) -> None:
        """SIGKILL one run's runner mid-run, then resume it with ``runner watch RUN``."""
        name = self.plan.killed
        self._until(lambda: name in self.run_ids)
        if not self.run_ids.get(name):  # that run never started: nothing to kill
            return
        runner = self.runners[name]
        if not self._until(
            lambda: runner.poll() is not None or self.commits(name) >= self.plan.kill_after
        ):
            return
        if runner.poll() is not None:  # it ended before: nothing to kill
            return
        self.runners[name].kill()
        self.runners[name].communicate()
        self.runners[name] = self._runner("watch", self.run_ids[name])
        self.done.append(f"killed the {name} runner")

    def faults(self) -> int:
        """Calls the fault plan failed."""
        return self.fault_plan.total()

    def chaos(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=step, daemon=True)
            for step in (self.preempt, self.freeze, self.kill_runner)
        ]
        for thread in threads:
            thread.start()
        return threads

    def close(self) -> None:
        self._stop.set()
        for proc in self.runners.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        if self.frozen and (vm := self.lifetimes.procs.get(self.frozen)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm.pid, signal.SIGCONT)
        self.fake.stop()
        if self.proxies is not None:
            self.proxies.stop()


def run_seed(
    seed: int,
    workdir: Path,
    *,
    shards: int = 6,
    rate: float = 0.0,
    kinds: Collection[str] | None = None,
) -> SeedResult:
    """One seed's scenario, start to end, checked and measured, with each call failing with
    probability ``rate`` (in one of ``kinds``: None, every kind). Never raises for what it
    finds: the problems are in the result."""
    plan = Plan.draw(seed, shards)
    result = SeedResult(seed, plan)
    started = time.monotonic()
    s = Scenario(plan, workdir, rate=rate, kinds=kinds)
    try:
        s.submit()
        chaos = s.chaos()
        ended = s._until(lambda: _runs_ended(s, chaos[-1]), timeout=RUN_LIMIT)
        if not ended:
            result.problems.append(f"the runs did not end within {RUN_LIMIT:.0f} s")
        for name in RUNS:
            proc = s.runners[name]
            if s.run_ids.get(name):
                result.problems += check_run(s, name, proc.poll(), s.log(proc))
            else:
                tail = " | ".join(s.log(proc).strip().splitlines()[-2:])
                result.problems.append(f"{name}: runner exited {proc.poll()} with no run: {tail}")
        runs_ended = time.monotonic()
        if not s._until(lambda: drained(s.fake), timeout=DRAIN_WINDOW):
            left = sorted(s.fake.live())
            result.problems.append(f"VMs left {DRAIN_WINDOW:.0f} s after the runs: {left}")
        result.drain = time.monotonic() - runs_ended
        measure(s, result, IDLE_BOUND)
        result.faults = s.faults()
        missing = {"preempted", "froze", "killed"} - {d.split()[0] for d in s.done}
        if missing and all(
            s.run_ids.get(name) for name in RUNS
        ):  # the chaos did not all happen: it proved less
            result.problems.append(f"chaos not applied: {sorted(missing)}")
    finally:
        s.close()
        result.seconds = time.monotonic() - started
    return result


def _runs_ended(s: Scenario, killer: threading.Thread) -> bool:
    ended = all(p.poll() is not None for p in s.runners.values())
    return ended and not killer.is_alive() and not any(r.is_alive() for r in s.readers)
