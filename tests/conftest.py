"""Test-session wiring shared by every folder.

``make test`` runs the suite in several processes (pytest-xdist, ``--dist loadgroup``): most
tests wait on real processes and emulators, not on the CPU. Tests that share costly
session-wide set-up stay in one process each: the container tests (their images are built once
per machine, and two builds of the same image at once would each do all the work) and the CDKTF
synthesis (several seconds per process). The emulators are the session's: the first process
that needs them starts them, the others use the same, and the session stops them at its end. The
longest tests start first (whole runs on the emulators), the unit tests fill in at the end.

A test skipped because this machine lacks something it needs (``tests.prerequisites.missing``)
is listed with the reason at the end of the run, under "missing prerequisites".
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.emulators import SHARED, stop_shared
from tests.prerequisites import MISSING

_SESSION_EMULATORS = pytest.StashKey[Path]()

_GROUPS = {
    "tests/containers/": "containers",
    "tests/e2e/test_containers.py": "containers",
    "tests/infra/": "infra",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups from the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(str(config.rootpath))
    for item in items:
        rel = Path(str(item.path)).relative_to(root).as_posix()
        for prefix, group in _GROUPS.items():
            if rel.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
                break
    # The longest tests first, so that none starts at the end of the run with the other
    # processes idle: whole runs on the emulators, then other runs and emulator tests, and the
    # unit tests (a second or less each) last, to fill the gaps. xdist hands the groups out
    # first (the most tests first), then the rest in this order.
    items.sort(key=_weight)


def _weight(item: pytest.Item) -> int:
    """0 for a whole run on the emulators, 1 for a run or an emulator test, 2 for the rest."""
    marks = {mark.name for mark in item.iter_markers()}
    return 2 - ("e2e" in marks) - ("emulator" in marks)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    reasons: Counter[str] = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = getattr(report, "longrepr", None)
        if isinstance(longrepr, tuple) and MISSING in str(longrepr[2]):
            reasons[str(longrepr[2]).removeprefix("Skipped: ")] += 1
    if reasons:
        terminalreporter.section("missing prerequisites", sep="=", yellow=True, bold=True)
        for reason, count in reasons.most_common():
            terminalreporter.line(f"{count:4d} skipped: {reason}", yellow=True)


def _sigint_state() -> tuple[object, bool]:
    """This process's Ctrl-C handling: its handler, and whether the signal is blocked."""
    import signal

    return signal.getsignal(signal.SIGINT), signal.SIGINT in signal.pthread_sigmask(
        signal.SIG_BLOCK, set()
    )


def pytest_configure(config: pytest.Config) -> None:
    """Take Ctrl-C as a terminal's foreground job does, whatever started the tests.

    A shell without job control starts a background job (``make test &``, a CI step) with
    SIGINT ignored, and an ignored signal survives exec: every process a test starts would then
    ignore it too (Python leaves an inherited SIG_IGN as it is), and each test that interrupts
    a run would watch it go on as if no Ctrl-C had come. Runs in every xdist process.
    """
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if not hasattr(config, "workerinput"):  # the session's first process: xdist's or the only
        folder = tempfile.mkdtemp(prefix="cflow-session-emulators-")
        os.environ[SHARED] = folder  # the xdist processes, started after this, inherit it
        config.stash[_SESSION_EMULATORS] = Path(folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_SESSION_EMULATORS, None)
    if folder is not None:
        stop_shared(folder)
        os.environ.pop(SHARED, None)


@pytest.fixture(autouse=True)
def _ctrl_c_left_as_found() -> Iterator[None]:
    """A test that leaves Ctrl-C ignored or blocked in this process passes that on to every
    process the later tests start (an ignored or blocked signal survives exec): a Ctrl-C test
    then hangs far from its cause. Fail the test that did it instead."""
    before = _sigint_state()
    yield
    after = _sigint_state()
    if after != before:
        import signal

        signal.signal(signal.SIGINT, before[0])  # type: ignore[arg-type]
        if not before[1]:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        pytest.fail(f"this test left Ctrl-C changed in the test process: {before} -> {after}")
