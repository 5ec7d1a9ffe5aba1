"""The test set-up itself (not CFlow): how a run knows it is under CI, where a missing
prerequisite must fail rather than skip."""

from __future__ import annotations

import pytest

from tests.prerequisites import MISSING, missing, under_ci


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "yes", "woodpecker"])
def test_every_spelling_ci_services_use_is_ci(value: str) -> None:
    assert under_ci({"CI": value})


@pytest.mark.parametrize("value", [None, "", "0", "false", "False", "no", "off"])
def test_unset_or_false_is_not_ci(value: str | None) -> None:
    assert not under_ci({} if value is None else {"CI": value})


def test_a_missing_prerequisite_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"^{MISSING}: no widget"):
        missing("no widget")


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_a_missing_prerequisite_fails_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=f"^{MISSING} under CI: no widget"):
        missing("no widget")
