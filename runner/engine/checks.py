"""Checks a task must pass before any shard is published.

What can be known without running a shard is checked here, so a task that cannot start fails
once, on the runner, instead of on every attempt of every shard:

- ``task.py`` parses, and defines a top-level ``run`` that accepts one positional argument;
- it imports, in a fresh interpreter with the task folder on ``PYTHONPATH``, and ``run`` is
  callable with one argument there. This runs the module's top-level code on this machine, so it
  is skipped when the task has a ``requirements.txt`` (installing it is not cheap) and given up,
  not failed, when importing takes longer than :data:`IMPORT_TIMEOUT`;
- ``task.sh`` passes ``bash -n``;
- ``cflow.toml``, when present, is valid.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from worker.bundle import PYTHON_ENTRY, REQUIREMENTS, SHELL_ENTRY, inspect_task, read_settings
from worker.errors import TaskError
from worker.executors.base import WORKER_PATH
from worker.protocol import Entry

IMPORT_TIMEOUT = 20.0  # seconds the import check may take before it is given up

_PROBE = """
import inspect, sys
import task
run = getattr(task, "run", None)
if not callable(run):
    sys.exit("task.py has no callable run(shard) after import")
try:
    inspect.signature(run).bind(object())
except TypeError as exc:
    sys.exit(f"run{inspect.signature(run)} cannot be called as run(shard): {exc}")
except ValueError:
    pass  # a builtin or C function without a signature: trust it
"""


@dataclass
class CheckReport:
    entry: Entry
    notes: list[str]  # what was skipped or given up, for the submit narration
    probe: ImportProbe | None = None  # the import check, when still running (``wait=False``)

    def finish(self) -> None:
        """Wait for the import check; raise TaskError with the task's last error line."""
        if self.probe is not None:
            probe, self.probe = self.probe, None
            note = probe.result()
            if note:
                self.notes.append(note)


class ImportProbe:
    """The import check in a fresh interpreter, running while the runner goes on (a short
    local run's workers boot meanwhile); :meth:`result` waits for it."""

    def __init__(self, folder: Path):
        self.folder = folder
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(folder.resolve()), WORKER_PATH]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self._deadline = time.monotonic() + IMPORT_TIMEOUT
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )

    def result(self) -> str | None:
        """None when the task imports; a note when the check was given up; raises TaskError."""
        try:
            _, stderr = self._proc.communicate(timeout=max(0.0, self._deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.cancel()
            return f"import check given up: importing task.py took over {IMPORT_TIMEOUT:g}s"
        if self._proc.returncode != 0:
            code = self._proc.returncode
            last = ((stderr or "").strip().splitlines() or [f"exit code {code}"])[-1]
            raise TaskError(f"{self.folder / PYTHON_ENTRY} cannot start: {last}")
        return None

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()


def check_task(folder: Path, *, import_check: bool = True, wait: bool = True) -> CheckReport:
    """Raise TaskError with the task's own last error line when it cannot start. With
    ``wait=False`` the import check is left running: :meth:`CheckReport.finish` ends it."""
    info = inspect_task(folder)
    read_settings(folder)
    report = CheckReport(info.entry, [])
    if info.entry is Entry.SHELL:
        _check_shell(folder / SHELL_ENTRY)
        return report
    _check_signature(folder / PYTHON_ENTRY)
    if not import_check:
        return report
    req = folder / REQUIREMENTS
    if req.is_file() and any(
        line.strip() and not line.lstrip().startswith("#") for line in req.read_text().splitlines()
    ):
        report.notes.append("import check skipped: the task has requirements.txt")
        return report
    report.probe = ImportProbe(folder)
    if wait:
        report.finish()
    return report


def _check_signature(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    run = next(
        node
        for node in tree.body
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == "run"
    )
    if isinstance(run, ast.AsyncFunctionDef):
        raise TaskError(f"{path}: run is async; define it with plain `def run(shard):`")
    args = run.args
    positional = [*args.posonlyargs, *args.args]
    required = len(positional) - len(args.defaults)
    kw_required = [
        a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None
    ]
    if required > 1 or kw_required or (not positional and args.vararg is None):
        shown = ast.unparse(run.args)
        raise TaskError(
            f"{path} line {run.lineno}: run({shown}) must take exactly one argument, the shard:"
            " `def run(shard):`"
        )


def _check_shell(path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        raise TaskError("bash is not on PATH; shell tasks need it")
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["syntax error"])[-1]
        raise TaskError(f"{path} has a syntax error: {last}")
