"""A script of a test's own, run as a user runs one: its own interpreter, a clean environment
(the system's PATH, a home of its own) with this checkout on its import path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python SCRIPT ARGS`` in ``cwd`` (also its home), its output captured as text."""
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONPATH": str(REPO)},
    )
