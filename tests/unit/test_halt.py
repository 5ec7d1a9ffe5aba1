from __future__ import annotations

import pytest

from runner.engine.halt import HaltJudge, HaltRule
from worker.errors import ConfigError
from worker.protocol import Event, EventKind


def _ev(kind: EventKind, detail: str | None = None, run: str = "r1") -> Event:
    return Event(kind=kind.value, worker="w", run_id=run, shard_id="s", detail=detail)


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
