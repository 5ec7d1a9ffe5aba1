"""checkov (PyPI) on the synthesized Terraform JSON: no failed check, every skip explained.

checkov pins ``packaging<24`` while pytest needs ``packaging>=24``, so it lives in its own tool
venv, ``.venv-checkov`` (``CFLOW_CHECKOV`` may name another binary).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Synth

pytestmark = pytest.mark.infra

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "infra" / "checkov.yaml"
INSTALL = "python3 -m venv .venv-checkov && .venv-checkov/bin/pip install checkov==3.3.30"


def _checkov() -> str:
    """From the environment that runs the tests: ``CFLOW_CHECKOV``, then ``PATH``, then the tool
    venv ``make install`` makes beside this checkout."""
    candidates = [
        os.environ.get("CFLOW_CHECKOV"),
        shutil.which("checkov"),
        str(REPO / ".venv-checkov/bin/checkov"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail(f"checkov is not installed; install it with: {INSTALL} (or set CFLOW_CHECKOV)")


def test_every_skipped_check_has_a_reason() -> None:
    skips = re.findall(r"^\s*-\s*(CKV2?_\w+)(.*)$", CONFIG.read_text(), flags=re.M)
    assert skips, "the config lists no skipped checks; drop this test if that is on purpose"
    for check_id, rest in skips:
        assert re.match(r"\s*#\s*\S.{10,}", rest), f"{check_id} is skipped without a reason"


def test_checkov_finds_nothing(synth: Synth) -> None:
    proc = subprocess.run(
        [_checkov(), "--config-file", str(CONFIG), "-f", str(synth.json_file), "-o", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report: Any = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [
        f"{c['check_id']} {c['check_name']} on {c['resource']}"
        for r in reports
        for c in r.get("results", {}).get("failed_checks", [])
    ]
    assert not failed, "checkov failed:\n" + "\n".join(failed)
    assert proc.returncode == 0, proc.stderr
    summary = reports[0]["summary"]
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 20  # it really looked at the resources
