"""A missing emulator skips the Google Cloud tests loudly, and fails them under CI."""

from __future__ import annotations

import pytest

from tests.emulators import unavailable


def test_missing_emulator_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="EMULATOR UNAVAILABLE"):
        unavailable("no java")


def test_missing_emulator_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="emulator unavailable under CI: no java"):
        unavailable("no java")
