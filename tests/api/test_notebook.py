"""``examples/python_api.ipynb`` executed by a real Jupyter kernel (ipykernel, driven by
nbclient): the progress bar is an HTML output updated in place, the results and the failure
come back, the report shows inline. Also the progress displays picked outside a notebook."""

from __future__ import annotations

import ast
import io
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

import cflow
from cflow.progress import NotebookBar, PlainLines, TerminalLine, Ticker, pick
from cflow.results import Progress
from worker.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "python_api.ipynb"


def _outputs(cell: Any, kind: str) -> list[Any]:
    return [o for o in cell.outputs if o.output_type == kind]


@pytest.mark.e2e
def test_the_example_notebook_runs_in_a_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)  # the kernel inherits this environment
    nb = nbformat.read(EXAMPLE, as_version=4)
    # The kernel starts in tmp_path: the notebook's runs go to its ./.cflow
    client = NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    mapped, failing, submitted = (c for c in nb.cells if c.cell_type == "code")

    # The bar: one display output, updated in place to the run's end (nbclient applies the
    # kernel's update_display_data to the output with the same display id).
    bars = [
        o
        for o in _outputs(mapped, "display_data")
        if "cflow-progress" in o.data.get("text/html", "")
    ]
    assert len(bars) == 1, mapped.outputs
    assert "24/24 done · 0 failed · 0 running · 0 queued" in bars[0].data["text/html"]
    assert "24/24 done" in bars[0].data["text/plain"]
    (value,) = _outputs(mapped, "execute_result")
    assert ast.literal_eval(value.data["text/plain"]) == [x * x + 1 for x in range(24)]

    printed = "".join(o.text for o in _outputs(failing, "stream") if o.name == "stdout")
    assert "item 3 failed: " in printed and "NotWelcome: 3 is not welcome" in printed
    assert "the notebook's own class: True" in printed
    assert not _outputs(failing, "error")

    text = "".join(o.text for o in _outputs(submitted, "stream") if o.name == "stdout")
    assert "[10, 20, 30] [101, 401, 901]" in text
    shown = _outputs(submitted, "display_data")
    (bar,) = (o for o in shown if "cflow-progress" in o.data.get("text/html", ""))
    assert "3/3 done" in bar.data["text/html"]  # as_completed's; results() found it over
    pictures = [o for o in shown if "image/png" in o.data]
    assert len(pictures) == 1  # run.report(): the picture inline, nothing written here
    assert not list(tmp_path.glob("*-report.*"))
    assert len(list((tmp_path / ".cflow" / "runs").iterdir())) == 3  # the CLI's store


def test_outside_a_notebook_the_display_follows_the_stream() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(pick(None, "r1", Tty()), TerminalLine)
    assert isinstance(pick(True, "r1", io.StringIO()), PlainLines)
    assert isinstance(pick("notebook", "r1", io.StringIO()), NotebookBar)
    assert pick(False, "r1", Tty()) is None
    with pytest.raises(ConfigError, match="progress='bar': give True, False, or one of"):
        pick("bar", "r1")


def test_plain_lines_come_at_their_pace_and_once_at_the_end() -> None:
    now = [0.0]
    counts = iter(
        Progress(total=10, succeeded=n, failed=0, running=min(2, 10 - n), cached=1)
        for n in (0, 4, 4, 9, 9)
    )
    out = io.StringIO()
    ticker = Ticker(PlainLines("r1", out), lambda: next(counts), clock=lambda: now[0])
    ticker.tick()  # shown: the first look
    now[0] = 1.0
    ticker.tick()  # not due
    now[0] = 5.0
    ticker.tick()  # due
    now[0] = 10.0
    ticker.tick()  # due, and the same: not said again
    now[0] = 15.0
    ticker.tick()  # due
    ticker.close()  # the same as the last line: not said again
    ticker.close()  # once
    assert out.getvalue().splitlines() == [
        "cflow: run r1: 0/10 done (1 cached) · 0 failed · 2 running · 8 queued",
        "cflow: run r1: 4/10 done (1 cached) · 0 failed · 2 running · 4 queued",
        "cflow: run r1: 9/10 done (1 cached) · 0 failed · 1 running · 0 queued",
    ]


def test_a_bad_progress_choice_is_refused_before_anything_runs(
    local_backend: dict[str, Any],
) -> None:
    with pytest.raises(ConfigError, match="progress='yes'"):
        cflow.submit(abs, [1], progress="yes", **local_backend)
    assert not Path(local_backend["store"]).exists()


def test_the_terminal_line_is_redrawn_in_place_and_ended_once() -> None:
    out = io.StringIO()
    line = TerminalLine("r1", out)
    line.show(Progress(total=4, succeeded=1, failed=0, running=2), final=False)
    line.show(Progress(total=4, succeeded=3, failed=1, running=0), final=True)
    first, second = out.getvalue().split("\r")[1:]
    bar = "#" * 8 + "-" * 22  # a quarter of 30
    assert first == f"cflow: [{bar}] 1/4 done · 0 failed · 2 running · 1 queued\x1b[K"
    assert second.startswith("cflow: [" + "#" * 30 + "] 4/4 done · 1 failed · 0 running")
    assert out.getvalue().count("\n") == 1 and out.getvalue().endswith("\x1b[K\n")


@pytest.mark.e2e
def test_a_report_is_written_where_asked_outside_a_notebook(
    local_backend: dict[str, Any], tmp_path: Path
) -> None:
    run = cflow.submit(abs, [-1, 2], progress=False, **local_backend)
    assert list(run.results()) == [1, 2]
    page = run.report(tmp_path / "out" / "run.html")
    assert page == tmp_path / "out" / "run.html"
    assert "<img" in page.read_text() and (tmp_path / "out" / "run.png").stat().st_size > 0
    with pytest.raises(ConfigError, match=r"name a \.html"):
        run.report(tmp_path / "run.txt")


NOTEBOOK_CLASSES = """\
import dataclasses
import cflow

STOP = {"the", "a", "of"}

@dataclasses.dataclass(frozen=True)
class Doc:
    words: tuple

@dataclasses.dataclass
class Counted:
    n: int

def count(doc):
    return Counted(sum(w not in STOP for w in doc.words))

run = cflow.submit(count, [Doc(("the", "cat")), Doc(("a", "tale", "of", "two"))], cache=True,
                   progress=False)
values = run.results()
print([v.n for v in values], all(type(v) is Counted for v in values), run.progress().cached)
"""


@pytest.mark.e2e
def test_a_notebooks_classes_map_and_are_reused_after_its_kernel_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel's workers are never its forks: its classes reach them by value. A restarted
    # kernel pickles the same cell's function and items in the same bytes: the cache reuses.
    for name in ("CFLOW_DEPLOYMENT", "CFLOW_BACKEND", "CFLOW_STORE"):
        monkeypatch.delenv(name, raising=False)
    printed = []
    for _ in range(2):  # a kernel each time, as after a restart
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(NOTEBOOK_CLASSES)]
        NotebookClient(
            nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        printed.append("".join(o.text for o in _outputs(nb.cells[0], "stream")).strip())
    assert printed == ["[1, 2] True 0", "[1, 2] True 2"]
