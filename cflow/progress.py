"""A run's progress while Python waits on it, shown where the caller is looking.

- In a Jupyter kernel: an HTML bar, one output updated in place through an IPython display
  handle (``display(..., display_id=True)`` then ``handle.update``); no ipywidgets needed, and
  the saved notebook keeps the last state.
- On a terminal: one line redrawn on stderr.
- Elsewhere (a log file, CI): a plain line every :data:`PLAIN_EVERY` seconds and one at the end.

:func:`pick` chooses one (``progress=False`` shows nothing; ``"notebook"``, ``"terminal"`` or
``"plain"`` force one). The display is driven from the caller's thread while it waits
(:class:`Ticker`), so a notebook's output lands in the cell that waits.
"""

from __future__ import annotations

import html
import sys
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from cflow.results import Progress
from worker.errors import ConfigError

NOTEBOOK_EVERY = 0.5  # seconds between updates of a notebook's bar
TERMINAL_EVERY = 0.25  # seconds between redraws of a terminal's line
PLAIN_EVERY = 5.0  # seconds between plain lines
BAR_WIDTH = 30  # characters of the terminal's bar
KINDS = ("notebook", "terminal", "plain")

# The notebook bar's segments: (the Progress count, its colour).
SEGMENTS = (("succeeded", "#2e7d32"), ("failed", "#c62828"), ("running", "#1565c0"))

ProgressChoice = bool | str | None  # None or True: pick by where this runs; False: none


def describe(p: Progress) -> str:
    """The counts in one line: ``12/40 done (3 cached) · 1 failed · 4 running · 23 queued``."""
    cached = f" ({p.cached} cached)" if p.cached else ""
    total = f"{p.total}+" if p.publishing else str(p.total)
    line = (
        f"{p.done}/{total} done{cached} · {p.failed} failed · {p.running} running"
        f" · {p.queued} queued"
    )
    if p.halted:
        return f"{line} · halted: {p.halted}"
    return line + (" · cancelled" if p.cancelled else "")


class Display(Protocol):
    """Shows a run's progress; :meth:`show` is called at most every :attr:`every` seconds and
    once more with ``final`` at the end of the wait."""

    every: float

    def show(self, p: Progress, final: bool) -> None: ...


class _Bar:
    """What a notebook shows: ``_repr_html_`` for Jupyter, the plain line for anything else."""

    def __init__(self, run_id: str, p: Progress):
        self.run_id = run_id
        self.p = p

    def __repr__(self) -> str:
        return f"cflow run {self.run_id}: {describe(self.p)}"

    def _repr_html_(self) -> str:
        p = self.p
        whole = max(p.total, 1)
        parts = "".join(
            f'<div style="width:{100 * getattr(p, name) / whole:.2f}%;background:{colour}"></div>'
            for name, colour in SEGMENTS
            if getattr(p, name)
        )
        return (
            f'<div class="cflow-progress" data-run="{html.escape(self.run_id)}"'
            ' style="font-family:monospace;font-size:13px">'
            '<div style="display:flex;height:12px;width:360px;background:#e0e0e0;'
            f'border-radius:3px;overflow:hidden">{parts}</div>'
            f"<div>run {html.escape(self.run_id)}: {html.escape(describe(p))}</div></div>"
        )


class NotebookBar:
    """An HTML bar in the waiting cell, updated in place."""

    every = NOTEBOOK_EVERY

    def __init__(self, run_id: str):
        self.run_id = run_id
        self._handle: Any = None

    def show(self, p: Progress, final: bool) -> None:
        from IPython.display import display  # loaded: this runs in a kernel (see pick)

        bar = _Bar(self.run_id, p)
        if self._handle is None:
            self._handle = display(bar, display_id=True)
        else:
            self._handle.update(bar)


class TerminalLine:
    """One line on a terminal, redrawn in place; a newline ends it."""

    every = TERMINAL_EVERY

    def __init__(self, run_id: str, stream: IO[str]):
        self.run_id = run_id
        self.stream = stream

    def show(self, p: Progress, final: bool) -> None:
        filled = round(BAR_WIDTH * p.done / p.total) if p.total else 0
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        # \r back to the line's start, \x1b[K clears what a longer line left
        end = "\n" if final else ""
        self.stream.write(f"\rcflow: [{bar}] {describe(p)}\x1b[K{end}")
        self.stream.flush()


class PlainLines:
    """A self-contained line now and then, for logs."""

    every = PLAIN_EVERY

    def __init__(self, run_id: str, stream: IO[str]):
        self.run_id = run_id
        self.stream = stream
        self._said = ""

    def show(self, p: Progress, final: bool) -> None:
        line = f"cflow: run {self.run_id}: {describe(p)}\n"
        if line == self._said:  # nothing new (a quick run's end, seen by its last look)
            return
        self._said = line
        self.stream.write(line)
        self.stream.flush()


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (an IPython shell with a kernel); a terminal
    IPython is not one."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has loaded it
    if ipython is None:
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def pick(choice: ProgressChoice, run_id: str, stream: IO[str] | None = None) -> Display | None:
    """The display for ``choice`` (see the module's docstring); None shows nothing.

    Raises:
        ConfigError: ``choice`` is a string that names no display.
    """
    check(choice)
    err = stream if stream is not None else sys.stderr
    if choice is False:
        return None
    if choice is None or choice is True:
        if in_notebook():
            return NotebookBar(run_id)
        choice = "terminal" if _is_terminal(err) else "plain"
    if choice == "notebook":
        return NotebookBar(run_id)
    if choice == "terminal":
        return TerminalLine(run_id, err)
    return PlainLines(run_id, err)


def check(choice: ProgressChoice) -> None:
    """Raises ConfigError, one line, when ``choice`` names no display."""
    if choice is None or isinstance(choice, bool) or choice in KINDS:
        return
    raise ConfigError(
        f"progress={choice!r}: give True, False, or one of {', '.join(map(repr, KINDS))}"
    )


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stand-in stream
        return False


class Ticker:
    """Feeds a display from the caller's thread: :meth:`tick` in the wait loop shows the
    progress when the display is due, :meth:`close` shows the last state once.

    A display only informs: a failure to read or show the progress (a store that does not
    answer for a moment) skips that update and never ends the wait or hides what it raised.
    """

    def __init__(
        self,
        display: Display | None,
        read: Callable[[], Progress],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.display = display
        self._read = read
        self._clock = clock
        self._last = float("-inf")
        self._closed = False

    def tick(self) -> None:
        if self.display is None or self._closed:
            return
        now = self._clock()
        if now - self._last >= self.display.every:
            self._last = now
            self._show(final=False)

    def close(self) -> None:
        if self.display is None or self._closed:
            return
        self._closed = True
        self._show(final=True)

    def _show(self, final: bool) -> None:
        assert self.display is not None
        try:
            progress = self._read()
        except Exception:
            return
        self.display.show(progress, final)
