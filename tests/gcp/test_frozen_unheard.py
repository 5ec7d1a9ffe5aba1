"""A VM frozen for good while its run's runner is down is deleted by the resumed ``runner watch``,
which never heard from it, and no VM busy with another run is touched.

First the rules on a fake clock: a worker never heard from is silent once the runner has listed
it running for a lease and a heartbeat, is then no capacity while work remains, and the drain
after the run waits that bound out (saying so) instead of giving up. Then through the CLI on the
Google Cloud path: the emulators, real ``python -m worker --backend gcp`` processes as the fake
group's VMs, two runs sharing the group. Run A's runner judges a VM frozen (SIGSTOP: no
heartbeats, its lease not extended) and is killed (SIGKILL); the runner resumed with
``runner watch A`` never hears from that VM. Run B holds two other VMs busy the whole time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from runner.engine import runs
from runner.engine.fleet import Fleet, Instance
from runner.engine.lost import attempt_holders
from runner.engine.release import Release
from runner.engine.run_view import RunView
from runner.engine.watch import Watcher
from tests.e2e.conftest import make_task, wait_for
from tests.emulators import Deployment
from tests.gcp.conftest import MakeCompute, worker_spawner
from tests.gcp.faults import SLOW_CREATE, FaultPlan
from tests.gcp.test_concurrent_runs import _holding, _only_first_attempts, _started
from tests.gcp.test_gcp_e2e import GROUP, ZONE, Cloud, _cloud
from tests.gcp.test_promises_gcp import _stop_when_deleted
from worker import defaults
from worker.backends.local.backend import open_local
from worker.clock import FakeClock
from worker.protocol import AttemptStatus, Event, Layout, RunOptions, Shard, ShardResult

SILENCE = defaults.LEASE_SECONDS + defaults.HEARTBEAT_SECONDS  # unheard this long: silent


class ListedGroup(Fleet):
    """The runner's view of a group, as a list: what it lists, grows and deletes. It keeps no
    lease records, as a managed instance group keeps none."""

    def __init__(self, *names: str) -> None:
        self.live = {n: Instance(n) for n in names}
        self.grown = 0
        self.deleted: list[str] = []

    def instances(self) -> list[Instance]:
        return list(self.live.values())

    def grow(self, count: int) -> list[str]:
        made = [f"new{self.grown + i}" for i in range(count)]
        self.grown += count
        self.live.update((n, Instance(n)) for n in made)
        return made

    def delete(self, names: Iterable[str]) -> None:
        for name in names:
            self.deleted.append(name)
            self.live.pop(name, None)


def test_the_drain_waits_out_the_bound_for_a_vm_it_never_heard_then_deletes_it() -> None:
    clock = FakeClock()
    view = RunView("r1")
    said: list[str] = []
    release = Release(
        view, "r1", clock, silence=SILENCE, say=said.append, records=lambda: {"frozen"}
    )
    group = ListedGroup("frozen", "theirs")

    def listen() -> None:  # "theirs" runs a shard of another run and says so at every look
        now = clock.monotonic()
        view.apply(Event("heartbeat", "theirs", "r2", "s9", at=clock.time()), now)

    started = clock.monotonic()
    assert release.wait(group, listen, timeout=30.0, pace=0.5)
    waited = clock.monotonic() - started
    assert group.deleted == ["frozen"]  # judged frozen past the bound; the busy one left be
    assert SILENCE < waited <= SILENCE + 1.0, waited  # not given up on after 30 s
    assert len(said) == 1 and "frozen" in said[0] and "theirs" not in said[0], said
    assert said[0].startswith("waiting up to 35s for frozen, not heard from"), said


def test_a_vm_that_speaks_within_the_bound_is_not_deleted() -> None:
    clock = FakeClock()
    view = RunView("r1")
    said: list[str] = []
    release = Release(view, "r1", clock, silence=SILENCE, say=said.append, records=lambda: {"slow"})
    group = ListedGroup("slow")
    looks = iter(range(1000))

    def listen() -> None:  # after 20 s it starts a shard of another run
        if next(looks) * 0.5 >= 20.0:
            view.apply(Event("started", "slow", "r2", "s9", at=clock.time()), clock.monotonic())

    assert release.wait(group, listen, timeout=30.0, pace=0.5)
    assert group.deleted == [] and clock.monotonic() - 1_700_000_000.0 < 21.0
    assert said == []  # heard before half the bound: nothing to say


def test_a_vm_never_heard_and_named_by_no_record_of_the_run_is_left_alone() -> None:
    """A resumed runner may miss another run's events (its subscription delivers late): a VM it
    never heard from is waited for (it may yet say it is idle), and once silent past the bound
    deleted only if the run's own records show it holding one of the run's attempts."""
    clock = FakeClock()
    view = RunView("r1")
    said: list[str] = []
    reads: list[int] = []

    def records() -> set[str]:
        reads.append(1)
        return {"frozen"}

    release = Release(view, "r1", clock, silence=SILENCE, say=said.append, records=records)
    group = ListedGroup("frozen", "theirs")  # "theirs" is busy, but this runner hears nothing

    def listen() -> None:
        if clock.monotonic() - started >= 2.0:  # the event stream delivers from then on
            view.apply(Event("heartbeat", "other", "r3", "s7", at=clock.time()), clock.monotonic())

    started = clock.monotonic()
    assert release.wait(group, listen, timeout=30.0, pace=0.5)
    assert group.deleted == ["frozen"] and "theirs" in group.live
    assert len(said) == 1 and "theirs" not in said[0], said
    assert reads == [1]  # the records are read once
    # And with no record naming it, the frozen one is left too, once the bound is out, and
    # nothing said of it (it is not deleted).
    view, clock = RunView("r1"), FakeClock()
    said.clear()
    release = Release(view, "r1", clock, silence=SILENCE, say=said.append, records=set)
    group = ListedGroup("frozen", "theirs")
    assert release.wait(group, lambda: None, timeout=30.0, pace=0.5)
    assert group.deleted == [] and said == []


def test_a_vm_never_heard_is_waited_for_and_deleted_once_it_says_it_is_idle() -> None:
    """A VM of the group this runner never heard (it came up for an earlier run) may speak
    within the bound: its idle word then frees it, records or not."""
    clock = FakeClock()
    view = RunView("r1")
    release = Release(view, "r1", clock, silence=SILENCE, records=set)
    group = ListedGroup("quiet")
    started = clock.monotonic()

    def listen() -> None:  # it says it is idle 5 s into the drain
        if clock.monotonic() - started >= 5.0 and not view.heard("quiet"):
            view.apply(Event("idle", "quiet", at=clock.time()), clock.monotonic())

    assert release.wait(group, listen, timeout=30.0, pace=0.5)
    assert group.deleted == ["quiet"] and clock.monotonic() - started < 7.0


def test_the_run_records_name_the_workers_holding_its_attempts_that_never_ended(
    tmp_path: Path,
) -> None:
    b = open_local(tmp_path / "store")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.py").write_text("def run(shard):\n    pass\n")
    m = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=tmp_path / "task",
        shards=[Shard(id=f"s{i}", index=i) for i in range(3)],
        options=RunOptions(),
    )
    run_id = m.run_id

    def attempt(shard: str, n: int, worker: str, state: str = "running") -> None:
        record = AttemptStatus(run_id, shard, n, state, worker, started_at=1.0)
        b.store.put(Layout.status(run_id, shard, n), record.to_json())

    def commit(shard: str, n: int, worker: str) -> None:
        won = ShardResult(run_id, shard, n, worker, started_at=1.0, finished_at=2.0)
        b.store.put(Layout.result(run_id, shard), won.to_json())

    attempt("s0", 1, "frozen")  # froze; its lease lapsed and attempt 2 committed the shard
    attempt("s0", 2, "w2")  # the winner's record stays "running": result.json is its end
    commit("s0", 2, "w2")
    attempt("s1", 1, "w3")  # one attempt, committed: not even read
    commit("s1", 1, "w3")
    attempt("s2", 1, "w4", "preempted")
    attempt("s2", 2, "w5")  # still running (a cancelled run): this run's
    assert attempt_holders(b.store, run_id) == {"frozen", "w5"}
    b.close()


def test_a_slow_event_stream_gets_no_busy_vm_taken_for_frozen() -> None:
    """A resumed runner's new events subscription may deliver nothing for a while: a worker it
    has not heard yet is counted silent only from when it began hearing anyone."""
    view = RunView("r1")
    view.listed([Instance("theirs"), Instance("frozen")], 0.0)
    assert view.silent(SILENCE + 1.0, SILENCE) == set()  # heard no one yet: cannot tell
    start = SILENCE + 5.0  # the stream begins delivering; "frozen" never speaks
    view.apply(Event("heartbeat", "other", "r2", "s8", at=start), start)
    view.apply(Event("heartbeat", "theirs", "r2", "s9", at=start + 1.0), start + 1.0)
    assert view.silent(start + SILENCE, SILENCE) == set()
    assert view.silent(start + SILENCE + 0.5, SILENCE) == {"frozen"}
    assert view.unheard(start + 1.0, SILENCE) == {"frozen": SILENCE - 1.0}


def test_a_vm_never_heard_is_no_capacity_once_silent(tmp_path: Path) -> None:
    clock = FakeClock()
    b = open_local(tmp_path / "store", clock=clock)
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "task.py").write_text("def run(shard):\n    pass\n")
    m = runs.create_run(
        store=b.store,
        queue=b.queue,
        task_dir=tmp_path / "task",
        shards=[Shard(id="s0", index=0)],
        options=RunOptions(),
    )
    group = ListedGroup("frozen")  # listed running when this runner starts, and never heard
    w = Watcher(
        manifest=m,
        store=b.store,
        queue=b.queue,
        events=b.events,
        fleet=group,
        max_workers=1,
        clock=clock,
        expect_heartbeats=True,
    )
    w.poll()
    clock.advance(SILENCE + 1.0)
    w.poll()
    # Within the bound it may still speak, and while this runner has heard no one at all its
    # own events may be what is slow: another bound before it is taken for silent.
    assert group.grown == 0
    clock.advance(SILENCE)
    w.poll()
    assert group.grown == 1 and group.deleted == []  # a replacement; the frozen one is left be
    for _ in range(2):  # listed at the first of these looks, silent by the second
        clock.advance(SILENCE + 1.0)
        w.poll()
    # The replacement came up under this runner's eyes: unheard, it may still be booting (a GPU
    # VM waits minutes for its driver), and is not replaced in turn while its boot allowance
    # lasts; once that is out it is taken for frozen before its first word, and replaced.
    assert group.grown == 1
    # (It was listed a look ago; while this runner has heard no one the bound is a silence
    # later again: its own ears may be what is slow.)
    clock.advance(defaults.BOOT_SECONDS - 10.0)
    w.poll()
    assert group.grown == 1
    clock.advance(20.0)
    w.poll()
    assert group.grown == 2 and group.deleted == []  # replaced, not deleted while work remains
    b.close()


def test_a_vm_never_heard_past_its_boot_allowance_is_free_once_the_run_is_over() -> None:
    """At the end of a run a VM never heard from is left to its own run's runner while it may
    still be booting; past the boot allowance it never started (or froze before its first
    word), works for no run, and is deleted."""
    clock = FakeClock()
    view = RunView("r1")
    view.apply(Event("idle", "other", at=clock.time()), clock.monotonic())  # the stream works
    view.listed([Instance("mute")], clock.monotonic())
    release = Release(view, "r1", clock, silence=SILENCE, records=set, boot=300.0)
    group = ListedGroup("mute")
    clock.advance(SILENCE + 1.0)
    assert release.drain(group) == [] and group.deleted == []  # silent, yet within its boot
    clock.advance(300.0 - SILENCE)
    release.drain(group)
    assert group.deleted == ["mute"]


# Seconds, for the workers and the runners alike: a worker unheard for LEASE + HEARTBEAT is
# silent to the runner (long enough that a loaded machine's event stream keeps up).
LEASE, HEARTBEAT = "11", "1"
BOOT = "20"  # and one never heard this long after it was listed running is taken for frozen

# Shards of run A mark their start (<worker>.<index>.<attempt>) and hold their worker until the
# `go-a` flag exists.
HOLD_A = """
import os, time
from pathlib import Path

def run(shard):
    marks = Path(os.environ["MARK_DIR"])
    (marks / f"a.{os.environ['CFLOW_WORKER_NAME']}.{shard.index}.{shard.attempt}").touch()
    while not (marks / "go-a").exists():
        time.sleep(0.1)
    (Path(shard.output_dir) / "index.txt").write_text(f"{shard.index}\\n")
"""


@pytest.mark.e2e
@pytest.mark.emulator
def test_a_vm_frozen_while_its_runner_was_down_is_deleted_by_the_resumed_watch(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    # The VMs come up at once, but the replacement of the frozen one takes 5 s to be created
    # (seed 3: the first slow creation takes 0.85 of ``delay``): listed starting across two of
    # B's looks, when B has two VMs more than its two shards need.
    slow = FaultPlan(1.0, seed=3, kinds={SLOW_CREATE}, delay=6.0)
    quick = contextlib.ExitStack()
    quick.enter_context(slow.suspended())
    cloud = _cloud(
        deployment,
        fake_compute,
        tmp_path,
        slow,
        env={"MARK_DIR": str(marks)},
        idle_timeout=120.0,  # only the runners delete VMs here
        extra_args=("--lease-seconds", LEASE, "--heartbeat", HEARTBEAT),
    )
    # The VM is frozen as its task starts, which may be before its worker's start event has
    # left it (events are published in the background): A's runner then never heard it, and
    # gives it the boot allowance before taking it for frozen (as in the test below): BOOT,
    # not the 15 minutes a GPU VM may need.
    cloud.env.update(
        CFLOW_LEASE_SECONDS=LEASE,
        CFLOW_HEARTBEAT_SECONDS=HEARTBEAT,
        CFLOW_BOOT_SECONDS=BOOT,
        CFLOW_LOG_LEVEL="INFO",
    )
    # B holds two VMs until the end of the test ("go" is the flag of its task).
    b = cloud.start("submit", str(_holding(tmp_path / "b", "b")), "--shards", "2", "--workers", "2")
    a = watch = None
    frozen_pid = None
    ended = threading.Event()
    try:
        assert b.stdout is not None
        b_id = b.stdout.readline().strip()
        wait_for(lambda: len(_started(marks, "b")) == 2, 90, "run B's shards on two VMs")
        b_vms = {m.split(".")[1] for m in _started(marks, "b")}
        # B's two VMs are busy with B's shards, no capacity of A's: four shards get A four VMs.
        a = cloud.start(
            "submit", str(make_task(tmp_path / "a", HOLD_A)), "--shards", "4", "--workers", "4"
        )
        assert a.stdout is not None
        a_id = a.stdout.readline().strip()
        first = wait_for(lambda: _started(marks, "a"), 90, "a shard of run A running")[0]
        frozen = first.split(".")[1]
        frozen_pid = cloud.fake.live()[frozen].pid
        quick.close()
        os.kill(frozen_pid, signal.SIGSTOP)  # for good: no heartbeats, its lease lapses
        threading.Thread(
            target=_stop_when_deleted, args=(cloud, frozen, frozen_pid, ended), daemon=True
        ).start()
        # A's runner took the frozen VM for stale once its lease lapsed (or, never heard from,
        # once its boot allowance was out): it started a replacement, which runs the frozen
        # VM's shard (a fifth VM).
        try:
            wait_for(
                lambda: len({m.split(".")[1] for m in _started(marks, "a")}) >= 5,
                90,
                "a replacement of the frozen VM running a shard of A",
            )
        except AssertionError as exc:  # what A's runner said and did, for whoever reads this
            a.kill()
            _, said = a.communicate(timeout=30)
            raise AssertionError(
                f"{exc}; frozen {frozen}; A's marks {sorted(_started(marks, 'a'))}; VMs"
                f" {sorted(cloud.fake.live())}, deleted {cloud.fake.deleted}; A's runner said:\n"
                + "\n".join(said.splitlines()[-40:])
            ) from None
        # Nothing was deleted while both runs worked: B had more VMs than its two shards
        # needed, but the replacement booting was A's (its runner wrote down the ask).
        if cloud.fake.deleted:  # who deleted what, for whoever reads this
            for proc in (a, b):
                proc.kill()
            said = {name: p.communicate(timeout=30)[1] for name, p in (("A", a), ("B", b))}
            raise AssertionError(
                f"deleted {cloud.fake.deleted} while both runs worked; frozen {frozen}; A's marks"
                f" {sorted(_started(marks, 'a'))}; B's VMs {sorted(b_vms)};"
                f" VMs {sorted(cloud.fake.live())}\n"
                + "\n".join(
                    f"{name}: {line}"
                    for name, text in said.items()
                    for line in text.splitlines()
                    if "cflow.runner" in line
                )
            )
        a.kill()  # the runner of A goes down; the VM it knew frozen stays
        a.communicate(timeout=30)
        assert frozen not in cloud.fake.deleted
        (marks / "go-a").touch()
        watch = cloud.start("watch", a_id)
        _, watched = watch.communicate(timeout=120)
        assert watch.returncode == 0, watched
        # The resumed runner never heard from the frozen VM: it waited out the bound and
        # deleted it; B's VMs, busy all along, are left alone.
        assert frozen in cloud.fake.deleted, watched
        assert not b_vms & set(cloud.fake.deleted), (b_vms, cloud.fake.deleted)
        (marks / "go").touch()
        _, b_err = b.communicate(timeout=120)
    finally:
        ended.set()
        if frozen_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen_pid, signal.SIGCONT)
        for proc in (a, b, watch):
            if proc is not None and proc.poll() is None:
                proc.kill()
    assert b.returncode == 0, b_err
    assert cloud.status(a_id)["counts"]["succeeded"] == 4
    _only_first_attempts(cloud, b_id, 2)  # no attempt of B preempted: no busy VM deleted
    wait_for(cloud.fake.is_empty, 60, "the group at zero")
    assert not cloud.fake.resized_down()


@pytest.mark.e2e
@pytest.mark.emulator
def test_a_vm_frozen_before_its_first_word_is_replaced_and_deleted(
    deployment: Deployment, fake_compute: MakeCompute, tmp_path: Path
) -> None:
    """The group's first VM freezes as it boots, before its worker says anything (SIGSTOP at
    its birth): the runner, which saw it come up, gives it the boot allowance, then takes it
    for frozen: a replacement runs the shards, and the frozen VM is deleted at the end."""
    holder: dict[str, str] = {}
    worker = worker_spawner(
        deployment,
        logs=tmp_path / "vms",
        group=GROUP,
        zone=ZONE,
        endpoint=lambda: holder["endpoint"],
        extra_args=("--lease-seconds", "6", "--heartbeat", "1"),
    )
    born_frozen: list[subprocess.Popen[Any]] = []

    def spawn(name: str) -> subprocess.Popen[Any]:
        proc = worker(name)
        if not born_frozen:  # stopped before its interpreter has even started
            os.kill(proc.pid, signal.SIGSTOP)
            born_frozen.append(proc)
        return proc

    fake = fake_compute(spawn=spawn, group=GROUP, zone=ZONE)
    holder["endpoint"] = fake.endpoint
    cloud = Cloud(deployment, fake, tmp_path)
    cloud.env.update(CFLOW_LEASE_SECONDS="6", CFLOW_HEARTBEAT_SECONDS="1", CFLOW_BOOT_SECONDS="3")
    task = make_task(tmp_path / "task", "def run(shard):\n    pass\n")
    submit = cloud.start("submit", str(task), "--shards", "2", "--workers", "1")
    ended = threading.Event()
    try:
        wait_for(lambda: born_frozen, 60, "the group's first VM")
        frozen = born_frozen[0]
        name = next(n for n, p in fake.live().items() if p.pid == frozen.pid)
        threading.Thread(
            target=_stop_when_deleted, args=(cloud, name, frozen.pid, ended), daemon=True
        ).start()
        try:
            _, stderr = submit.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            submit.kill()
            pytest.fail(f"the run did not end: the frozen VM was waited for\n{submit.stderr}")
    finally:
        ended.set()
        for proc in born_frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, stderr
    assert name in fake.deleted, stderr
    assert "some workers are still stopping" not in stderr
