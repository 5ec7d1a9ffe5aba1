"""What a test does when something it needs is not on this machine: one rule for the whole suite.

On a developer's machine a missing prerequisite (an emulator, a container engine, terraform, an
old Python) skips the tests that need it, and the end of the run lists every such skip under
"missing prerequisites" (tests/conftest.py), so a shorter run is never a quiet one. Under CI it
is a failure: a CI machine that lacks a prerequisite is a broken machine, not a reason to test
less.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest

MISSING = "MISSING PREREQUISITE"  # how the skips of missing prerequisites begin
_NOT_CI = ("", "0", "false", "no", "off")


def under_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is a CI run: ``CI`` set as CI services set it (``CI=true``; any spelling of
    it, ``True``, ``1`` or a service's name, counts). Unset, empty, ``0``, ``false``, ``no``
    and ``off`` do not."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() not in _NOT_CI


def missing(reason: str) -> NoReturn:
    """Skip the test that needs what ``reason`` names, or fail it under CI."""
    if under_ci():
        pytest.fail(f"{MISSING} under CI: {reason}", pytrace=False)
    pytest.skip(f"{MISSING}: {reason}")
