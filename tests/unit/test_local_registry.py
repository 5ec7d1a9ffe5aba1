"""The local fleet's registry gives a worker name once per store, whichever fleet asks."""

from __future__ import annotations

from pathlib import Path

from runner.backends.local.registry import Registry


def test_a_name_whose_worker_is_gone_is_not_given_again(tmp_path: Path) -> None:
    """Two fleets of one run (the submit's and its watch's) both count from 0: a name whose
    worker exited, its entry gone, still belongs to that worker; the next one is new."""
    submits = Registry(tmp_path, "r-1")
    first, _ = submits.claim(0)
    second, _ = submits.claim(1)
    submits.record(first, 101, None)
    submits.record(second, 102, None)
    submits.forget(first)  # local-0 exited: its entry goes, its log stays
    watchs = Registry(tmp_path, "r-1")
    third, n = watchs.claim(0)
    assert (first, second, third, n) == ("local-0", "local-1", "local-2", 2)
    assert (tmp_path / "fleet" / "logs" / "local-2.log").exists()  # given from now on
    other_run = Registry(tmp_path, "r-2")
    assert other_run.claim(0)[0] == "local-3"  # names are the store's, not a run's


def test_two_claims_at_once_get_two_names(tmp_path: Path) -> None:
    a, b = Registry(tmp_path, "r-1"), Registry(tmp_path, "r-1")
    assert {a.claim(0)[0], b.claim(0)[0]} == {"local-0", "local-1"}
