"""``Run.report()``: the picture ``runner report`` draws, written to a file and, in a notebook,
shown inline (the PNG through ``IPython.display``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cflow.progress import in_notebook
from runner.observe.render import check_report_out, render
from runner.observe.timeline import build_timeline
from worker.errors import ConfigError
from worker.store import Store
from worker.tempdirs import temp_folder


def report(store: Store, run_id: str, path: str | Path | None) -> Path | None:
    """Draw run ``run_id``'s report to ``path`` (its suffix picks the format: ``.html``,
    ``.png``, ``.pdf``, ``.svg``) and show it inline when this runs in a notebook.

    Without a path a notebook only shows it (None is returned: nothing is kept), and anywhere
    else it is written to ``<run>-report.html`` in the working folder. Returns the file written.

    Raises:
        ConfigError: the suffix names no format, or matplotlib is not installed.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("run.report() draws with matplotlib: pip install 'cflow[report]'")
    shown = in_notebook()
    if path is None and shown:
        with temp_folder("report") as tmp:
            rendered = render(build_timeline(store, run_id), Path(tmp) / f"{run_id}.png")
            _show(rendered.picture)
        return None
    target = check_report_out(Path(path) if path is not None else Path(f"{run_id}-report.html"))
    rendered = render(build_timeline(store, run_id), target)
    if shown:
        _show(rendered.picture)
    return rendered.html or rendered.picture


def _show(png: Path) -> None:
    from IPython.display import Image, display  # loaded: this runs in a kernel (in_notebook)

    display(Image(data=png.read_bytes(), format="png"))
