"""The --halt rule: the runner's judge over events, and each worker's judge over its attempts,
both per round (the run as submitted, then each retry)."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pytest

from runner.engine import rounds, runs
from runner.engine.halt import HaltJudge, round_rule
from worker.agent.agent import Agent, AgentConfig
from worker.agent.halt_rule import HaltRule
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.bundle import pack
from worker.errors import ConfigError
from worker.protocol import (
    AttemptStatus,
    Event,
    EventKind,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    ShardResult,
    WorkMessage,
)

BROKEN = "def run(shard):\n    raise ValueError('the input format changed')\n"
REASON = "ValueError: the input format changed"
FIXED = """
from pathlib import Path

def run(shard):
    (Path(shard.output_dir) / "v.txt").write_text("ok")
"""


def _ev(
    kind: EventKind, detail: str | None = None, run: str = "r1", at: float = 100.0, attempt: int = 1
) -> Event:
    return Event(
        kind=kind.value, worker="w", run_id=run, shard_id="s", attempt=attempt, detail=detail, at=at
    )


# -- the rule and the runner's judge --------------------------------------------------------


def test_parse_accepts_the_documented_forms_only() -> None:
    assert HaltRule.parse("never") == HaltRule("never")
    assert HaltRule.parse("same,fail=3") == HaltRule("same", 3)
    assert HaltRule.parse(" NOW,fail=1 ") == HaltRule("now", 1)
    for bad in ("soon", "now,fail=0", "same,fail=x", "now,success=1", "fail=3", ""):
        with pytest.raises(ConfigError, match="is not a rule"):
            HaltRule.parse(bad)


def test_same_halts_on_the_first_n_failures_alike_and_ignores_other_runs() -> None:
    judge = HaltJudge(HaltRule("same", 3), "r1")
    assert judge.saw(_ev(EventKind.RETRYING, "ImportError: x")) is None
    assert judge.saw(_ev(EventKind.FAILED, "boom", run="r2")) is None  # another run's
    assert judge.saw(_ev(EventKind.PREEMPTED)) is None
    assert judge.saw(_ev(EventKind.FAILED, "run cancelled")) is None  # stopped, not failed
    assert judge.saw(_ev(EventKind.RETRYING, "ImportError: x")) is None
    assert judge.saw(_ev(EventKind.RETRYING, "ImportError: x")) == (
        "the first 3 attempts all failed with: ImportError: x"
    )


def test_same_is_disarmed_by_a_success_or_by_different_reasons() -> None:
    judge = HaltJudge(HaltRule("same", 2), "r1")
    judge.saw(_ev(EventKind.SUCCEEDED))
    assert judge.saw(_ev(EventKind.FAILED, "a")) is None
    assert judge.saw(_ev(EventKind.FAILED, "a")) is None
    mixed = HaltJudge(HaltRule("same", 2), "r1")
    mixed.saw(_ev(EventKind.FAILED, "a"))
    assert mixed.saw(_ev(EventKind.FAILED, "b")) is None
    assert mixed.saw(_ev(EventKind.FAILED, "b")) is None  # only the first N count


def test_now_counts_every_failure_and_never_never_halts() -> None:
    now = HaltJudge(HaltRule("now", 2), "r1")
    now.saw(_ev(EventKind.SUCCEEDED))
    assert now.saw(_ev(EventKind.FAILED, "a")) is None
    assert now.saw(_ev(EventKind.RETRYING, None)) == (
        "2 attempts failed (--halt now,fail=2); last: failed"
    )
    never = HaltJudge(HaltRule("never"), "r1")
    assert all(never.saw(_ev(EventKind.FAILED, "a")) is None for _ in range(10))


def test_a_retried_round_is_judged_on_its_own_attempts_and_code(tmp_path: Path) -> None:
    """After `retry --task`, the events of the halted round (replayed to a new watcher) and
    the attempts still running the old code never count; the new code's do."""
    b = open_local(tmp_path / "store")
    old, new = "a" * 64, "b" * 64
    manifest = Manifest(
        run_id="r1",
        bundle=new,
        entry="python",
        shard_count=4,
        bundles=[
            {"sha256": old, "at": 10.0, "shards": 4},
            {"sha256": new, "at": 50.0, "shards": 4},
        ],
    )
    for attempt, bundle in ((7, old), (8, new), (9, new), (10, new)):
        status = AttemptStatus("r1", "s", attempt, "failed", "w", 60.0, bundle=bundle)
        b.store.put(Layout.status("r1", "s", attempt), status.to_json())
    judge = HaltJudge.for_round(HaltRule("same", 3), manifest, b.store)
    for attempt in range(1, 4):  # the halted round, replayed: before the retry
        assert judge.saw(_ev(EventKind.RETRYING, "old", at=20.0, attempt=attempt)) is None
    assert judge.saw(_ev(EventKind.RETRYING, "old", at=60.0, attempt=7)) is None  # old code
    assert judge.saw(_ev(EventKind.RETRYING, "new", at=61.0, attempt=8)) is None
    assert judge.saw(_ev(EventKind.RETRYING, "new", at=62.0, attempt=9)) is None
    assert judge.saw(_ev(EventKind.RETRYING, "new", at=63.0, attempt=10)) == (
        "the first 3 attempts all failed with: new"
    )


def test_the_rule_to_watch_by_is_the_runs_own_unless_given() -> None:
    recorded = Manifest("r1", "a" * 64, "python", 1, options=RunOptions(halt="never").to_dict())
    assert round_rule(recorded, None) == HaltRule("never")
    assert round_rule(recorded, "now,fail=2") == HaltRule("now", 2)
    older = Manifest("r1", "a" * 64, "python", 1)  # from before runs recorded their rule
    assert round_rule(older, None) == HaltRule("same", 3)


# -- each worker's judge, on real agents and a local store ----------------------------------


def _run(tmp_path: Path, body: str, shards: int, **options: object) -> tuple[Backends, Manifest]:
    task = tmp_path / "task"
    task.mkdir(parents=True, exist_ok=True)
    (task / "task.py").write_text(textwrap.dedent(body))
    b = open_local(tmp_path / "store")
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    listing = [Shard(id=f"s{i}", index=i) for i in range(shards)]
    manifest = Manifest(
        run_id="r-halt",
        bundle=sha,
        entry="python",
        shard_count=shards,
        options=RunOptions(**options).to_dict(),  # type: ignore[arg-type]
    )
    b.store.put(Layout.manifest(manifest.run_id), manifest.to_json())
    shard_file = tmp_path / "shards.jsonl"
    shard_file.write_text("".join(s.to_json().decode() + "\n" for s in listing))
    b.store.put_file(Layout.shard_list(manifest.run_id), shard_file)
    b.queue.publish(WorkMessage(run_id=manifest.run_id, shard=s.to_dict()) for s in listing)
    return b, manifest


def _agent(b: Backends, tmp_path: Path, name: str = "w1") -> Agent:
    return Agent(
        queue=b.queue,
        store=b.store,
        events=b.events,
        ledger=b.ledger,
        config=AgentConfig(
            name=name, scratch=tmp_path / f"scratch-{name}", slots=1, burst=True, poll_seconds=0.2
        ),
    )


def _attempts(b: Backends, run_id: str) -> list[AttemptStatus]:
    keys = b.store.list(Layout.shards_prefix(run_id), suffix="status.json")
    return [AttemptStatus.from_json(b.store.get(k)) for k in keys]


def test_a_worker_halts_a_run_no_runner_watches(tmp_path: Path) -> None:
    b, m = _run(tmp_path, BROKEN, 10, halt="same,fail=3")
    _agent(b, tmp_path).run()
    after = runs.load_manifest(b.store, m.run_id)
    assert after.state == RunState.CANCELLED.value
    assert after.halted == f"the first 3 attempts all failed with: {REASON}"
    assert len(_attempts(b, m.run_id)) == 3  # not the 30 the run would have burnt


def test_a_worker_never_halts_without_a_recorded_rule_or_with_never(tmp_path: Path) -> None:
    for halt in (None, "never"):
        b, m = _run(tmp_path / str(halt), BROKEN, 2, halt=halt, max_attempts=2)
        _agent(b, tmp_path / str(halt)).run()
        after = runs.load_manifest(b.store, m.run_id)
        assert after.state == RunState.ACTIVE.value and after.halted is None
        assert len(_attempts(b, m.run_id)) == 4  # every attempt of every shard ran


def test_a_worker_leaves_a_run_that_commits_elsewhere_alone(tmp_path: Path) -> None:
    """Its own first attempts all failed alike, but another worker committed a shard of the
    round: the task works there, so this worker does not stop the run."""
    b, m = _run(tmp_path, BROKEN, 3, halt="same,fail=3", max_attempts=2)
    done = ShardResult(m.run_id, "s0", 1, "elsewhere", 1.0, 2.0, bundle=m.bundle)
    b.store.put(Layout.result(m.run_id, "s0"), done.to_json())
    _agent(b, tmp_path).run()
    after = runs.load_manifest(b.store, m.run_id)
    assert after.state == RunState.ACTIVE.value and after.halted is None
    assert len(_attempts(b, m.run_id)) >= 4  # s1 and s2 used their whole budget


def test_a_retry_with_a_fixed_task_starts_a_fresh_round_on_the_same_worker(
    tmp_path: Path,
) -> None:
    b, m = _run(tmp_path, BROKEN, 6, halt="same,fail=3")
    worker = _agent(b, tmp_path)
    worker.run()
    assert runs.load_manifest(b.store, m.run_id).halted
    fixed = tmp_path / "fixed"
    fixed.mkdir()
    (fixed / "task.py").write_text(FIXED)
    stale = WorkMessage(run_id=m.run_id, shard=Shard(id="s0", index=0).to_dict(), bundle=m.bundle)
    b.queue.publish([stale])  # left on a queue that cannot purge, from the broken round
    assert sorted(rounds.retry(b.store, b.queue, m.run_id, task_dir=fixed)) == [
        f"s{i}" for i in range(6)
    ]
    b.queue.publish([stale])  # and one published after the purge: still of the old code
    worker.run()  # the same worker: its failures of the old code are forgotten
    after = runs.load_manifest(b.store, m.run_id)
    assert after.state == RunState.ACTIVE.value and after.halted is None
    for i in range(6):
        result = ShardResult.from_json(b.store.get(Layout.result(m.run_id, f"s{i}")))
        assert result.bundle == after.bundle != m.bundle
    ran = Counter(a.bundle for a in _attempts(b, m.run_id))
    assert ran == {m.bundle: 3, after.bundle: 6}  # the stale message never ran


def test_a_retry_of_the_same_task_gets_a_fresh_count_and_halts_again(tmp_path: Path) -> None:
    b, m = _run(tmp_path, BROKEN, 6, halt="same,fail=3")
    worker = _agent(b, tmp_path)
    worker.run()
    first = len(_attempts(b, m.run_id))
    rounds.retry(b.store, b.queue, m.run_id)
    worker.run()
    after = runs.load_manifest(b.store, m.run_id)
    assert after.state == RunState.CANCELLED.value and after.halted
    assert len(_attempts(b, m.run_id)) - first == 3  # three new attempts, not none
    assert [r["sha256"] for r in after.bundles] == [m.bundle, m.bundle]


def test_a_rule_given_later_is_the_one_the_workers_judge_by(tmp_path: Path) -> None:
    """`runner watch --halt RULE` and `runner retry --halt RULE` record the rule: the workers
    honour it as they do the one the run was submitted with."""
    b, m = _run(tmp_path, BROKEN, 2, halt="same,fail=3", max_attempts=2)
    assert rounds.record_halt(b.store, m.run_id, "never").run_options.halt == "never"
    _agent(b, tmp_path).run()
    assert runs.load_manifest(b.store, m.run_id).halted is None
    assert len(_attempts(b, m.run_id)) == 4
    rounds.retry(b.store, b.queue, m.run_id, halt="now,fail=1")
    _agent(b, tmp_path).run()
    after = runs.load_manifest(b.store, m.run_id)
    assert after.halted == f"1 attempts failed (--halt now,fail=1); last: {REASON}"
    assert len(_attempts(b, m.run_id)) == 5
