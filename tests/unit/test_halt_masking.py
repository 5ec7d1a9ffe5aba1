"""The reasons ``--halt same,fail=N`` compares: what varies from shard to shard is masked
(paths, numbers, ids, times) while two different errors stay two, on the runner's judge and on
each worker's, and the halt note shows one real reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner.engine import runs
from runner.engine.halt import HaltJudge
from worker.agent.agent import Agent, AgentConfig
from worker.agent.halt_rule import HaltRule, HaltTally, masked_reason, same_reason
from worker.backends.base import Backends
from worker.backends.local.backend import open_local
from worker.bundle import pack
from worker.protocol import (
    AttemptStatus,
    Event,
    EventKind,
    Layout,
    Manifest,
    RunOptions,
    RunState,
    Shard,
    WorkMessage,
)

ENOENT = "FileNotFoundError: [Errno 2] No such file or directory: "


def _wrong_path(n: int) -> str:
    return f"{ENOENT}'/data/part-{n:05d}.csv'"


# -- the masking ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        (_wrong_path(17), _wrong_path(3)),  # the docs' own example: a wrong path
        (f"{ENOENT}'north.csv'", f"{ENOENT}'south.csv'"),  # a quoted file name, relative
        (f'{ENOENT}"/mnt/a b/x.csv"', f"{ENOENT}'/mnt/c/y.csv'"),  # either quotes, spaces
        ("RuntimeError: bad path /data/x", "RuntimeError: bad path /data/yy"),
        ("OSError: cannot read ./in/a.txt", "OSError: cannot read ../in/b.txt"),
        ("OSError: cannot read ~/in/a.txt", "OSError: cannot read ~/in/b.txt"),
        ("grep: data/region-000.csv: No such file", "grep: data/region-011.csv: No such file"),
        ("error reading gs://bucket/in/a.csv", "error reading gs://bucket/in/b.csv"),
        ("C:\\in\\a.csv not found", "C:\\in\\b.csv not found"),
        (
            "/tmp/cflow/bundles/2b9f0a/task.sh: line 4: x: unbound variable",
            "/tmp/cflow/bundles/77c1d3/task.sh: line 9: x: unbound variable",
        ),
        ("ValueError: row 17 has 3 columns", "ValueError: row 4 has 12 columns"),
        ("MemoryError: cannot allocate 512MiB", "MemoryError: cannot allocate 1.5MiB"),
        ("ValueError: bad shard region-000.csv-6a59bab1", "ValueError: bad shard x.csv-0f3e2a11"),
        (
            "ValueError: no run r20261202-000037-f61c5c",
            "ValueError: no run r20261203-101010-0a0b0c",
        ),
        (
            "LookupError: 123e4567-e89b-12d3-a456-426614174000",
            "LookupError: 00000000-0000-4000-8000-0000000000ab",
        ),
        ("TimeoutError: at 2026-12-02T00:00:37Z", "TimeoutError: at 2026-12-03 11:02:05.123+01:00"),
        ("TimeoutError: at 00:00:37", "TimeoutError: at 11:02:05"),
        ("TypeError: <Model at 0x7f3a2b1c90>", "TypeError: <Model at 0x7f3a2b1d10>"),
        ("KeyError: commit 3fa9c0d1e2 missing", "KeyError: commit 0b1c2d3e4f missing"),
        ("ValueError:  two   spaces", "ValueError: two spaces"),
    ],
)
def test_what_varies_between_shards_is_masked(one: str, other: str) -> None:
    assert one != other
    assert masked_reason(one) == masked_reason(other)
    assert same_reason([one, other, one])


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("KeyError: 'price'", "KeyError: 'volume'"),  # short quoted names: two task bugs
        ("KeyError: 'col1'", "KeyError: 'col2'"),  # a name with a digit is a name
        (
            "ModuleNotFoundError: No module named 'numpy'",
            "ModuleNotFoundError: No module named 'pandas'",
        ),
        (_wrong_path(17), "PermissionError: [Errno 13] Permission denied: '/data/part-00017.csv'"),
        ("ValueError: could not convert 'abc'", "ValueError: could not convert 'xyz'"),
        ("timed out after 30 s", "killed by SIGKILL (out of memory?)"),
        ("exited with code 1", "exited with code 1; its last line: done"),
    ],
)
def test_different_errors_stay_different(one: str, other: str) -> None:
    assert masked_reason(one) != masked_reason(other)
    assert not same_reason([one, one, other])


def test_the_masked_form_names_what_it_masked() -> None:
    reason = "ValueError: part-00017.csv-6a59bab1 of r20261202-000037-f61c5c: '/d/x.csv' row 17"
    assert masked_reason(reason) == "ValueError: <shard> of <run>: '<path>' row <n>"
    assert masked_reason("KeyError: 'price'") == "KeyError: 'price'"


# -- the runner's judge and the workers' judge use it ---------------------------------------


def _event(reason: str, attempt: int) -> Event:
    return Event(
        kind=EventKind.RETRYING.value,
        worker="w",
        run_id="r1",
        shard_id=f"s{attempt}",
        attempt=1,
        detail=reason,
        at=100.0,
    )


def test_the_runners_judge_halts_on_a_wrong_path_and_shows_one_real_reason() -> None:
    judge = HaltJudge(HaltRule("same", 3), "r1")
    assert judge.saw(_event(_wrong_path(17), 1)) is None
    assert judge.saw(_event(_wrong_path(3), 2)) is None
    assert judge.saw(_event(_wrong_path(8), 3)) == (
        f"the first 3 attempts all failed with: {_wrong_path(17)}"
        " (the others alike but for their paths, numbers or ids)"
    )


def test_the_runners_judge_keeps_two_different_errors_apart() -> None:
    judge = HaltJudge(HaltRule("same", 3), "r1")
    for n, reason in enumerate(("KeyError: 'price'", "KeyError: 'volume'", "KeyError: 'price'")):
        assert judge.saw(_event(reason, n)) is None
    assert judge.verdict is None


def test_reasons_that_are_one_verbatim_are_shown_as_they_are() -> None:
    tally = HaltTally(HaltRule("same", 2))
    assert tally.failure("ValueError: bad") is None
    assert (
        tally.failure("ValueError: bad") == "the first 2 attempts all failed with: ValueError: bad"
    )


WRONG_PATH = """
from pathlib import Path

def run(shard):
    Path("/nonexistent/data", f"part-{shard.index:05d}.csv").read_text()
"""
KEY_BY_SHARD = """
def run(shard):
    {}[("price", "volume")[shard.index % 2]]
"""


def _worker_run(tmp_path: Path, body: str, shards: int) -> tuple[Backends, Manifest]:
    """A run with the default rule and one real worker that runs it until the queue is empty."""
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(textwrap.dedent(body))
    b = open_local(tmp_path / "store")
    data, sha = pack(task)
    b.store.put(Layout.bundle(sha), data)
    listing = [Shard(id=f"s{i}", index=i) for i in range(shards)]
    options = RunOptions(halt="same,fail=3", max_attempts=1).to_dict()
    manifest = Manifest("r-mask", sha, "python", shards, options=options)
    b.store.put(Layout.manifest(manifest.run_id), manifest.to_json())
    shard_file = tmp_path / "shards.jsonl"
    shard_file.write_text("".join(s.to_json().decode() + "\n" for s in listing))
    b.store.put_file(Layout.shard_list(manifest.run_id), shard_file)
    b.queue.publish(WorkMessage(run_id=manifest.run_id, shard=s.to_dict()) for s in listing)
    config = AgentConfig(
        name="w1", scratch=tmp_path / "scratch", slots=1, burst=True, poll_seconds=0.2
    )
    Agent(queue=b.queue, store=b.store, events=b.events, ledger=b.ledger, config=config).run()
    return b, manifest


def _reasons(b: Backends, run_id: str) -> list[str]:
    keys = b.store.list(Layout.shards_prefix(run_id), suffix="status.json")
    return [AttemptStatus.from_json(b.store.get(k)).reason or "" for k in keys]


def test_a_worker_halts_a_run_failing_on_a_wrong_path(tmp_path: Path) -> None:
    b, m = _worker_run(tmp_path, WRONG_PATH, 10)
    after = runs.load_manifest(b.store, m.run_id)
    assert after.state == RunState.CANCELLED.value
    assert after.halted is not None
    assert after.halted.startswith(
        f"the first 3 attempts all failed with: {ENOENT}'/nonexistent/data/part-0000"
    )
    reasons = _reasons(b, m.run_id)
    assert len(reasons) == 3 and len(set(reasons)) == 3  # three shards, three file names


def test_a_worker_does_not_halt_a_run_failing_on_different_keys(tmp_path: Path) -> None:
    b, m = _worker_run(tmp_path, KEY_BY_SHARD, 6)
    after = runs.load_manifest(b.store, m.run_id)
    assert after.state == RunState.ACTIVE.value and after.halted is None
    assert len(_reasons(b, m.run_id)) == 6  # every shard ran its one attempt
