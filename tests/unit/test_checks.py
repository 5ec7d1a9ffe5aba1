"""The checks before publishing: they refuse what cannot start, and only that.

The static check reads ``task.py`` without running it; the import check imports it in a real
interpreter. Every task source below goes through both, so a static refusal of something an
import would accept is a failing test, not a user's surprise.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from runner.engine.checks import ImportProbe, check_run, check_task
from worker.errors import TaskError
from worker.protocol import Entry

IMPL = "def helper(shard):\n    return shard\n\ndef two(shard, extra):\n    return shard\n"

# Tasks that bind a usable run, however they bind it: both checks must accept them.
VALID = {
    "plain def": "def run(shard):\n    pass\n",
    "imported under another name": "from impl import helper as run\n",
    "functools.partial": """
        import functools

        def _run(shard, scale):
            return scale

        run = functools.partial(_run, scale=2)
    """,
    "def under an if": """
        import sys

        if sys.version_info >= (3, 8):
            def run(shard):
                pass
    """,
    "try/except fallback": """
        try:
            from fastpath import run
        except ImportError:
            def run(shard):
                pass
    """,
    "lambda": "run = lambda shard: None\n",
    "a callable class": "class run:\n    def __init__(self, shard):\n        self.shard = shard\n",
    "a decorated def": """
        import functools

        def logged(f):
            @functools.wraps(f)
            def wrapper(*args):
                return f(*args)
            return wrapper

        @logged
        def run(shard):
            pass
    """,
    "bound by a function through global": """
        def _setup():
            global run
            def run(shard):
                pass

        _setup()
    """,
    "module __getattr__": """
        def __getattr__(name):
            if name == "run":
                return lambda shard: None
            raise AttributeError(name)
    """,
    "star import": "from impl import *\nrun = helper\n",
    "defaults after the shard": "def run(shard, retries=3, *, verbose=False):\n    pass\n",
    "varargs": "def run(*args):\n    pass\n",
}

# Tasks that cannot start, and the words of the line that says why.
INVALID = {
    "no run at all": ("def helper(shard):\n    pass\n", "no top-level run"),
    "run only inside a function": (
        "def main():\n    run = 1\n    return run\n",
        "no top-level run",
    ),
    "two required arguments": ("def run(shard, extra):\n    pass\n", "exactly one argument"),
    "no argument": ("def run():\n    pass\n", "exactly one argument"),
    "keyword-only argument": ("def run(shard, *, mode):\n    pass\n", "exactly one argument"),
    "a lambda of two": ("run = lambda a, b: None\n", "exactly one argument"),
    "async def": ("async def run(shard):\n    pass\n", "async"),
    "async def under an if": (
        "import sys\nif sys:\n    async def run(shard):\n        pass\n",
        "async",
    ),
    "imported, of two arguments": ("from impl import two as run\n", "cannot be called"),
    "not callable": ("run = 5\n", "not a function"),
    "partial still missing an argument": (
        "import functools\n\ndef f(a, b, c):\n    pass\n\nrun = functools.partial(f, c=1)\n",
        "cannot be called",
    ),
}


def _task(folder: Path, source: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "task.py").write_text(textwrap.dedent(source).lstrip())
    (folder / "impl.py").write_text(IMPL)
    return folder


def _imports(folder: Path) -> str | None:
    """None when the import check accepts the task; its refusal otherwise."""
    try:
        ImportProbe(folder).result()
    except TaskError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("name", sorted(VALID))
def test_a_run_bound_any_way_passes_both_checks(tmp_path: Path, name: str) -> None:
    folder = _task(tmp_path / "t", VALID[name])
    check_run(folder / "task.py")  # the static check alone
    assert _imports(folder) is None
    report = check_task(folder)  # and the whole check, as submit runs it
    assert report.entry is Entry.PYTHON and report.probe is None


@pytest.mark.parametrize("name", sorted(INVALID))
def test_a_task_that_cannot_start_is_refused_with_why(tmp_path: Path, name: str) -> None:
    source, words = INVALID[name]
    folder = _task(tmp_path / "t", source)
    with pytest.raises(TaskError, match=words):
        check_task(folder)


@pytest.mark.parametrize("name", sorted(VALID) + sorted(INVALID))
def test_the_static_check_refuses_only_what_the_import_check_refuses(
    tmp_path: Path, name: str
) -> None:
    source = VALID[name] if name in VALID else INVALID[name][0]
    folder = _task(tmp_path / "t", source)
    try:
        check_run(folder / "task.py")
    except TaskError:
        assert _imports(folder) is not None, "refused statically, yet it imports and runs"


def test_a_crlf_task_sh_is_refused_with_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    script = folder / "task.sh"
    script.write_bytes(b"#!/usr/bin/env bash\r\nset -euo pipefail\r\necho hi\r\n")
    with pytest.raises(TaskError) as refused:
        check_task(folder)
    line = str(refused.value)
    assert "CRLF" in line and "line 1" in line
    assert f"sed -i 's/\\r$//' {script}" in line and f"dos2unix {script}" in line
    script.write_bytes(script.read_bytes().replace(b"\r\n", b"\n"))  # the fix it names
    assert check_task(folder).entry is Entry.SHELL


def test_a_shell_syntax_error_is_still_refused(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "task.sh").write_text("if true; then\necho no fi\n")
    with pytest.raises(TaskError, match="syntax error"):
        check_task(folder)


def test_both_task_py_and_task_sh_is_refused(tmp_path: Path) -> None:
    folder = _task(tmp_path / "t", "def run(shard):\n    pass\n")
    (folder / "task.sh").write_text("echo hi\n")
    for code_checks in (True, False):
        with pytest.raises(TaskError, match=r"both task\.py and task\.sh"):
            check_task(folder, code_checks=code_checks)


def test_no_check_skips_the_checks_of_the_code_only(tmp_path: Path) -> None:
    no_run = _task(tmp_path / "a", "def helper(shard):\n    pass\n")
    report = check_task(no_run, code_checks=False)
    assert report.entry is Entry.PYTHON and report.probe is None
    assert report.notes == ["task checks skipped (--no-check)"]
    crlf = tmp_path / "b"
    crlf.mkdir()
    (crlf / "task.sh").write_bytes(b"echo hi\r\n")
    assert check_task(crlf, code_checks=False).entry is Entry.SHELL
    # What the runner itself must read still is checked.
    broken = _task(tmp_path / "c", "def run(:\n")
    with pytest.raises(TaskError, match="syntax error at line 1"):
        check_task(broken, code_checks=False)
    (no_run / "cflow.toml").write_text("[combine]\nheaders = 'yes'\n")
    with pytest.raises(TaskError, match="headers must be true or false"):
        check_task(no_run, code_checks=False)
