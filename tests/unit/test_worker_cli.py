"""The worker's flags: parsed by one parser a process, their defaults from the environment as it
is at each parse (a local worker forked from a Python caller gets the caller's environment only
when it is told its run, after the parser was built)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker import cli, defaults


def test_each_parse_takes_its_defaults_from_the_environment_as_it_is_then(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("STORE", "SLOTS", "RUN", "IDLE_TIMEOUT", "WORKER_NAME", "SCRATCH"):
        monkeypatch.delenv(f"CFLOW_{name}", raising=False)
    first = cli.parse_args([])
    assert first.store == Path(defaults.STORE_DIR) and first.slots == defaults.SLOTS
    assert first.run is None and first.idle_timeout is None and first.backend == "local"

    monkeypatch.setenv("CFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("CFLOW_SLOTS", "3")
    monkeypatch.setenv("CFLOW_RUN", "r1")
    monkeypatch.setenv("CFLOW_IDLE_TIMEOUT", "7.5")
    monkeypatch.setenv("CFLOW_WORKER_NAME", "local-4")
    monkeypatch.setenv("CFLOW_SCRATCH", str(tmp_path))
    second = cli.parse_args([])
    assert second.store == tmp_path / "store" and second.slots == 3 and second.run == "r1"
    assert second.idle_timeout == 7.5 and second.name == "local-4"
    assert second.scratch == tmp_path / "cflow"

    flagged = cli.parse_args(["--slots", "2", "--run", "r2", "--store", "/elsewhere", "--burst"])
    assert (flagged.slots, flagged.run, flagged.store, flagged.burst) == (
        2,
        "r2",
        Path("/elsewhere"),
        True,
    )

    monkeypatch.delenv("CFLOW_SLOTS")
    monkeypatch.delenv("CFLOW_RUN")
    third = cli.parse_args([])
    assert third.slots == defaults.SLOTS and third.run is None and not third.burst


def test_bad_flags_are_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.parse_args(["--slots", "0"])
    assert "--slots must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--backend", "gcp", "--run", "r1"])
    assert "--run applies to the local backend" in capsys.readouterr().err
