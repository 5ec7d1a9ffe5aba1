"""Checks a task must pass before any shard is published.

What can be known without running a shard is checked here, so a task that cannot start fails
once, on the runner, instead of on every attempt of every shard:

- the folder holds ``task.py`` or ``task.sh``, not both; ``task.py`` parses; ``cflow.toml``,
  when present, is valid. These always run.
- ``task.py`` binds a top-level ``run``. Where that is plain to see (one unconditional
  ``def run`` or ``run = lambda``), its signature must take one positional argument and it may
  not be async; a ``run`` bound any other way (imported, assigned, under an ``if``) is left to
  the import check, and so is a module that may bind names in ways the parser cannot see
  (``from x import *``, ``globals()``, a module ``__getattr__``). The static check refuses only
  what no import could accept.
- it imports, in a fresh interpreter with the task folder on ``PYTHONPATH``, and ``run`` is a
  plain callable with one positional argument there. This runs the module's top-level code on
  this machine, so it is skipped when the task has a ``requirements.txt`` (installing it is not
  cheap) and given up, not failed, when importing takes longer than :data:`IMPORT_TIMEOUT`;
- ``task.sh`` has Unix line endings and passes ``bash -n``.

``code_checks=False`` (``submit --no-check``) skips the last three: the task's code is then
trusted as it is.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from worker.bundle import (
    IGNORE,
    PYTHON_ENTRY,
    REQUIREMENTS,
    SHELL_ENTRY,
    bundle_files,
    inspect_task,
    is_ignored,
    read_settings,
)
from worker.errors import TaskError
from worker.executors.base import WORKER_PATH
from worker.protocol import Entry
from worker.tempdirs import temp_folder

IMPORT_TIMEOUT = 20.0  # seconds the import check may take before it is given up

_PROBE = """
import inspect, sys
try:
    import task
except SystemExit as exc:
    from worker.executors.zygote import exited_on_import
    sys.exit(exited_on_import(exc.code))
run = getattr(task, "run", None)
if run is None:
    sys.exit("task.py has no top-level run after import; define `def run(shard):`")
if not callable(run):
    sys.exit(f"task.py's run is a {type(run).__name__}, not a function; define `def run(shard):`")
if inspect.iscoroutinefunction(run) or inspect.iscoroutinefunction(getattr(run, "__call__", None)):
    sys.exit("run is async; define it with plain `def run(shard):`")
try:
    inspect.signature(run).bind(object())
except TypeError as exc:
    sys.exit(f"run{inspect.signature(run)} cannot be called as run(shard): {exc}")
except ValueError:
    pass  # a builtin or C function without a signature: trust it
"""

# Calls and names through which a module may bind ``run`` where the parser cannot see it.
_DYNAMIC_CALLS = frozenset({"globals", "vars", "exec", "eval", "setattr", "__import__"})
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


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
        # With a .cflowignore, the task is imported as the workers get it: what it leaves out
        # (a helper module) is missing here too, not only on every worker.
        self._view = _bundled_view(folder) if (folder / IGNORE).is_file() else None
        where = Path(self._view.name) if self._view is not None else folder.resolve()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(where), WORKER_PATH]),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        self._deadline = time.monotonic() + IMPORT_TIMEOUT
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE],
            cwd=where,
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
        finally:
            if self._view is not None:
                self._view.cleanup()
        if self._proc.returncode != 0:
            code = self._proc.returncode
            last = ((stderr or "").strip().splitlines() or [f"exit code {code}"])[-1]
            raise TaskError(f"{self.folder / PYTHON_ENTRY} cannot start: {last}")
        return None

    def cancel(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.communicate()
        if self._view is not None:
            self._view.cleanup()


def _bundled_view(folder: Path) -> tempfile.TemporaryDirectory[str]:
    """A folder of links to the files of ``folder`` that go into its bundle."""
    view = temp_folder("check")
    for path in bundle_files(folder):
        link = Path(view.name, path.relative_to(folder))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path.resolve())
    return view


def check_task(folder: Path, *, code_checks: bool = True, wait: bool = True) -> CheckReport:
    """Raise TaskError with the task's own last error line when it cannot start. With
    ``code_checks=False`` only the folder, the parse and ``cflow.toml`` are checked. With
    ``wait=False`` the import check is left running: :meth:`CheckReport.finish` ends it."""
    if (folder / PYTHON_ENTRY).is_file() and (folder / SHELL_ENTRY).is_file():
        raise TaskError(
            f"task folder {folder} has both {PYTHON_ENTRY} and {SHELL_ENTRY}; a task is one of"
            " them: remove (or rename) the one that should not run"
        )
    for entry in (PYTHON_ENTRY, SHELL_ENTRY):
        if (folder / entry).is_file() and is_ignored(folder, entry):
            raise TaskError(
                f"{folder / IGNORE} leaves {entry} out of the bundle, so no worker would have"
                f" a task to run: take {entry} out of {IGNORE}"
            )
    info = inspect_task(folder)
    read_settings(folder)
    report = CheckReport(info.entry, [])
    if not code_checks:
        report.notes.append("task checks skipped (--no-check)")
        return report
    if info.entry is Entry.SHELL:
        _check_shell(folder / SHELL_ENTRY)
        return report
    check_run(folder / PYTHON_ENTRY)
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


def check_run(path: Path) -> None:
    """Refuse a ``task.py`` whose ``run`` is certainly missing or certainly of the wrong shape;
    whatever the parser cannot be sure of is left to the import check."""
    tree = ast.parse(path.read_text(), filename=str(path))
    bindings = [node for node in _module_scope(tree) if _binds(node, "run")]
    dynamic = _binds_dynamically(tree)
    if not bindings and not dynamic:
        raise TaskError(
            f"{path} defines no top-level run; define `def run(shard):` (or bind `run` to a"
            " callable that takes the shard)"
        )
    if dynamic or len(bindings) != 1:
        return  # repeated or dynamic: the import check decides
    (node,) = bindings
    if node in tree.body and isinstance(node, ast.AsyncFunctionDef) and not node.decorator_list:
        raise TaskError(f"{path}: run is async; define it with plain `def run(shard):`")
    if node in tree.body and isinstance(node, ast.FunctionDef) and not node.decorator_list:
        _check_arguments(path, node.lineno, node.args)
    for stmt in tree.body:  # `run = lambda ...`, unconditional
        if isinstance(stmt, ast.Assign) and stmt.targets == [node] and _is_lambda(stmt.value):
            _check_arguments(path, stmt.lineno, stmt.value.args)


def _is_lambda(node: ast.expr) -> TypeGuard[ast.Lambda]:
    return isinstance(node, ast.Lambda)


def _check_arguments(path: Path, line: int, args: ast.arguments) -> None:
    positional = [*args.posonlyargs, *args.args]
    required = len(positional) - len(args.defaults)
    kw_required = [
        a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None
    ]
    if required > 1 or kw_required or (not positional and args.vararg is None):
        raise TaskError(
            f"{path} line {line}: run({ast.unparse(args)}) must take exactly one argument,"
            " the shard: `def run(shard):`"
        )


def _module_scope(tree: ast.Module) -> Iterator[ast.AST]:
    """Every node evaluated in the module's own scope (not inside a function or class body)."""
    stack: list[ast.AST] = list(tree.body)
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, _SCOPES):
            stack.extend(ast.iter_child_nodes(node))


def _binds(node: ast.AST, name: str) -> bool:
    """Whether ``node`` binds (or unbinds) ``name`` in the scope it is evaluated in."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Name):
        return node.id == name and not isinstance(node.ctx, ast.Load)
    if isinstance(node, ast.Import | ast.ImportFrom):
        return any((a.asname or a.name.split(".")[0]) == name for a in node.names)
    if isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar):
        return node.name == name
    if isinstance(node, ast.MatchMapping):
        return node.rest == name
    return False


def _binds_dynamically(tree: ast.Module) -> bool:
    """Whether the module may bind ``run`` where the parser cannot see it."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Global | ast.Nonlocal) and "run" in node.names:
            return True
        if isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in _DYNAMIC_CALLS:
            return True
        if isinstance(node, ast.Attribute) and node.attr in {"modules", "__dict__"}:
            return True  # sys.modules[__name__] replaced, or a module's __dict__ written
    # A module-level __getattr__ answers for any name it lacks.
    return any(_binds(node, "__getattr__") for node in _module_scope(tree))


def _check_shell(path: Path) -> None:
    data = path.read_bytes()
    if b"\r\n" in data:
        line = data[: data.index(b"\r\n")].count(b"\n") + 1
        quoted = shlex.quote(str(path))
        raise TaskError(
            f"{path} has Windows (CRLF) line endings (line {line} ends in \\r, which bash takes"
            f" as part of the command); convert it with `sed -i 's/\\r$//' {quoted}` or"
            f" `dos2unix {quoted}`"
        )
    bash = shutil.which("bash")
    if bash is None:
        raise TaskError("bash is not on PATH; shell tasks need it")
    proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["syntax error"])[-1]
        raise TaskError(f"{path} has a syntax error: {last}")
