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
from dataclasses import dataclass
from pathlib import Path

from worker.bundle import PYTHON_ENTRY, REQUIREMENTS, SHELL_ENTRY, inspect_task, read_settings
from worker.errors import TaskError
from worker.executor import _WORKER_PATH
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


@dataclass(frozen=True)
class CheckReport:
    entry: Entry
    notes: list[str]  # what was skipped or given up, for the submit narration


def check_task(folder: Path, *, import_check: bool = True) -> CheckReport:
    """Raise TaskError with the task's own last error line when it cannot start."""
    info = inspect_task(folder)
    read_settings(folder)
    notes: list[str] = []
    if info.entry is Entry.SHELL:
        _check_shell(folder / SHELL_ENTRY)
        return CheckReport(info.entry, notes)
    _check_signature(folder / PYTHON_ENTRY)
    if not import_check:
        return CheckReport(info.entry, notes)
    req = folder / REQUIREMENTS
    if req.is_file() and any(
        line.strip() and not line.lstrip().startswith("#") for line in req.read_text().splitlines()
    ):
        notes.append("import check skipped: the task has requirements.txt")
        return CheckReport(info.entry, notes)
    note = _check_import(folder)
    if note:
        notes.append(note)
    return CheckReport(info.entry, notes)


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


def _check_import(folder: Path) -> str | None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(folder.resolve()), _WORKER_PATH]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"import check given up: importing task.py took over {IMPORT_TIMEOUT:g}s"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise TaskError(f"{folder / PYTHON_ENTRY} cannot start: {last}")
    return None


def _check_shell(path: Path) -> None:
    bash = shutil.which("bash")
    if bash is None:
        raise TaskError("bash is not on PATH; shell tasks need it")
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["syntax error"])[-1]
        raise TaskError(f"{path} has a syntax error: {last}")
