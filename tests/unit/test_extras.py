"""A local install (`pip install '.[runner]'`, what `make demo` installs) has no Google Cloud
client and no matplotlib: local runs work, and a command that needs either says in one line
which extra to install."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from runner.config import REQUIRED_FOR_GCP

REPO = Path(__file__).resolve().parents[2]

# Imported first in each child: the packages of the extras cannot be found, as on a local install.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("google", "matplotlib"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Absent())
    """
)


def _python(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "absent_extras.py").write_text(BLOCKER)
    return subprocess.run(
        [sys.executable, "-c", f"import absent_extras, sys\n{code}", *args],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{REPO}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _runner(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _python(tmp_path, "from runner.cli.main import main\nmain(sys.argv[1:])", *args)


def _task(tmp_path: Path) -> Path:
    task = tmp_path / "task"
    task.mkdir()
    (task / "task.py").write_text(
        "def run(shard):\n    (shard.output_dir / 'o.txt').write_text('x\\n')\n"
    )
    return task


def test_a_local_run_needs_neither_extra(tmp_path: Path) -> None:
    task = _task(tmp_path)
    done = _runner(tmp_path, "submit", str(task), "--shards", "3", "--workers", "2", "--local")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_google_cloud_without_its_clients_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    task = _task(tmp_path)
    outputs = {name: {"value": f"cflow-{name}"} for name in REQUIRED_FOR_GCP} | {
        "zone": {"value": "europe-west1-b"}
    }
    (tmp_path / "cflow-outputs.json").write_text(json.dumps(outputs))
    done = _runner(tmp_path, "submit", str(task), "--shards", "3")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: Google Cloud needs its client libraries: ")
    assert "pip install 'cflow[gcp]'" in line


def test_the_report_without_matplotlib_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    task = _task(tmp_path)
    done = _runner(tmp_path, "submit", str(task), "--shards", "2", "--local")
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    report = _runner(tmp_path, "report", run_id, "--local")
    assert report.returncode == 2
    (line,) = report.stderr.strip().splitlines()
    assert "pip install 'cflow[report]'" in line


def test_a_worker_on_google_cloud_without_its_clients_says_which_extra(tmp_path: Path) -> None:
    code = "import runpy\nrunpy.run_module('worker', run_name='__main__')"
    done = _python(
        tmp_path,
        code,
        "--backend",
        "gcp",
        "--project",
        "p",
        "--bucket",
        "b",
        "--subscription",
        "s",
        "--events-topic",
        "e",
        "--scratch",
        str(tmp_path / "scratch"),
    )
    assert done.returncode == 2
    assert "pip install 'cflow[gcp-worker]'" in done.stderr
    assert "Traceback" not in done.stderr
