"""The docs name real things: every repository path, module and ``runner`` command they show exists.

Links and ``#anchors`` between the pages are checked by ``make lint`` (lychee, offline); these
tests cover what a link checker cannot see: paths and commands written as code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import typer.main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Folders the docs name that a command fills (make demo, the benchmarks): a checkout has none.
MADE_BY_COMMANDS = ("examples/data/", "bench/out/")

_FOLDERS = "runner|worker|infra|tests|bench|examples|task|docs"
_PATH = re.compile(rf"(?:{_FOLDERS})/[\w./-]*")
_MODULE = re.compile(r"-m\s+((?:runner|worker)(?:\.\w+)*)")
_RUNNER = re.compile(r"(?<![\w-])runner((?:\s+[^\s|;#)]+)*)")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_FILE = re.compile(r"[\w/]+\.(?:py|sh)")


def _code(doc: Path) -> list[str]:
    """The doc's inline code spans and the lines of its fenced blocks, in order."""
    found: list[str] = []
    fenced = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            found.append(line.split(" #", 1)[0])  # a shell comment is prose
        else:
            found.extend(re.findall(r"`([^`]+)`", line))
    return found


def _params(command: Any) -> set[str]:
    """Every option name a click command (or group) takes."""
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_paths_and_modules_exist(doc: Path) -> None:
    """A path in the repository or a ``-m`` module, written as code, is in the tree."""
    missing = []
    for code in _code(doc):
        for word in (w.strip("'\"(),;:") for w in code.split()):
            made = (word.rstrip("/") + "/").startswith(MADE_BY_COMMANDS)  # the folder too
            if _PATH.fullmatch(word) and not made and not (ROOT / word).exists():
                missing.append(word)
        for module in _MODULE.findall(code):
            path = ROOT / module.replace(".", "/")
            if not (path.with_suffix(".py").exists() or (path / "__init__.py").exists()):
                missing.append(f"-m {module}")
    assert not missing, f"{doc.relative_to(ROOT)} names what is not in the tree: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_runner_commands_and_options_exist(doc: Path) -> None:
    """Every ``runner COMMAND --option`` shown is one the CLI takes."""
    from runner.cli.main import app  # here, so the path checks run whatever the CLI's state

    group: Any = typer.main.get_command(app)
    commands = group.commands
    wrong = []
    for code in _code(doc):
        for match in _RUNNER.finditer(code):
            words = match.group(1).split()
            if not words:
                continue
            command = commands.get(words[0]) if not words[0].startswith("-") else group
            if command is None:
                wrong.append(f"runner {words[0]}")
                continue
            for option in _OPTION.findall(" ".join(words)):
                if option not in _params(command) | {"--help"}:
                    wrong.append(f"runner {words[0]} ... {option}")
    assert not wrong, f"{doc.relative_to(ROOT)} shows what `runner` does not take: {wrong}"


def test_architecture_rows_name_modules_on_disk() -> None:
    """Each row of the package table names modules that are in that package."""
    missing = []
    for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        cells = line.split("|")
        if len(cells) < 5 or not (package := re.match(r"\s*`([\w/]+/)`", cells[1])):
            continue
        folder = ROOT / package.group(1)
        for name in re.findall(r"`([^`]+)`", cells[3]):
            if _FILE.fullmatch(name) and not (folder / name).exists():
                missing.append(package.group(1) + name)
    assert not missing, f"docs/architecture.md names modules that are not there: {missing}"
