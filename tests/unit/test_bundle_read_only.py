"""An unpacked bundle's write bits come off in every worker that uses it, while another
worker's Python may be writing its bytecode there."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from worker.agent.pool import read_only


def test_a_file_gone_while_the_bundle_is_made_read_only_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``.pyc`` temporary file renamed away between the walk and its chmod failed the
    attempt with "[Errno 2] No such file or directory: .../task.cpython-311.pyc.1396..."."""
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "task.py").write_text("def run(shard):\n    pass\n")
    (tmp_path / "__pycache__" / "task.cpython-311.pyc.139697375795264").write_bytes(b"x")
    real = os.lstat

    def renamed_away(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if str(path).endswith(".pyc.139697375795264"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "lstat", renamed_away)
    read_only(tmp_path)
    monkeypatch.setattr(os, "lstat", real)
    assert not stat.S_IMODE((tmp_path / "task.py").stat().st_mode) & stat.S_IWUSR
    assert not stat.S_IMODE(tmp_path.stat().st_mode) & stat.S_IWUSR
    for path in (tmp_path / "__pycache__", tmp_path):  # writable again: tmp_path is removed
        path.chmod(0o755)
