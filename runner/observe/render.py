"""Draws a :class:`runner.observe.timeline.Timeline`: a picture (PNG, PDF or SVG; matplotlib), an
HTML page that embeds the PNG with the summary table, and a JSON sidecar of exactly what was drawn
(lanes in order, each bar's row, span and colour), so tests and scripts check the picture's
content without reading pixels.
"""

from __future__ import annotations

import base64
import errno
import html
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.observe.timeline import Bar, Lane, Timeline
from worker.errors import ConfigError

COLOURS = {
    "succeeded": "#2e7d32",
    "failed": "#c62828",
    "preempted": "#ef6c00",
    "discarded": "#9e9e9e",
    "running": "#1565c0",
    "lost": "#4a148c",
}
BILLED_COLOUR = "#e3e8ef"
PAGES = (".html", ".htm")  # a page that embeds the PNG
PICTURES = (".png", ".pdf", ".svg")  # the picture alone, in the format its name says
Box = list[tuple[float, float]]  # a rectangle's corners, for a PolyCollection


@dataclass(frozen=True)
class Rendered:
    picture: Path  # the PNG (an HTML page's too), PDF or SVG
    sidecar: Path
    html: Path | None = None

    @property
    def png(self) -> Path:
        """The picture, a PNG unless ``--out`` named a .pdf or .svg."""
        return self.picture


def check_report_out(out: Path) -> Path:
    """``out`` if its suffix names a format :func:`render` writes and the files it makes can be
    written there; else ConfigError, one line."""
    if out.suffix.lower() not in PAGES + PICTURES:
        raise ConfigError(
            f"report --out {out}: name a .html (a page with the picture), .png, .pdf or .svg file"
        )
    picture = out if out.suffix.lower() in PICTURES else out.with_suffix(".png")
    for path in dict.fromkeys((out, picture, out.with_suffix(".json"))):  # what render writes
        if path.is_dir():
            raise ConfigError(f"report --out {out}: {path} is a folder; name another file")
    parent = next((p for p in out.parents if p.exists()), Path("/"))
    try:
        if not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder")
        with tempfile.NamedTemporaryFile(prefix=".cflow-probe-", dir=parent):
            pass
    except OSError as exc:
        raise ConfigError(
            f"report --out {out}: cannot write in {parent} ({exc.strerror}); name a file in a"
            " folder you can write"
        ) from None
    return out


def render(timeline: Timeline, out: Path) -> Rendered:
    """Write the report next to ``out``: ``out`` itself (``.html``, ``.png``, ``.pdf`` or
    ``.svg``; a page's picture is a PNG beside it) and the ``.json`` sidecar with the same stem.
    Raises ConfigError, one line, when they cannot be written."""
    suffix = check_report_out(out).suffix.lower()
    picture = out if suffix in PICTURES else out.with_suffix(".png")
    sidecar = out.with_suffix(".json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        drawn = draw_png(timeline, picture)
        sidecar.write_text(json.dumps({"timeline": timeline.to_dict(), "drawn": drawn}, indent=1))
        if suffix in PAGES:
            out.write_text(html_page(timeline, picture.read_bytes()))
            return Rendered(picture, sidecar, out)
    except OSError as exc:  # checked above, but the disk may fill or a folder appear since
        where = exc.filename or out
        raise ConfigError(f"report --out {out}: cannot write {where} ({exc.strerror})") from None
    return Rendered(picture, sidecar)


def _fmt_seconds(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def summary_rows(timeline: Timeline) -> list[tuple[str, str]]:
    """The summary table, as (label, value) rows; the HTML page and the CLI both show it."""
    s = timeline.summary
    states = ", ".join(f"{n} {k}" for k, n in s.shard_states.items() if n)
    tries = ", ".join(f"{n} {k}" for k, n in s.attempts.items() if n)
    cost = f"${s.estimated_cost:.4f}" if s.estimated_cost is not None else "-"
    eff = f"{s.efficiency:.0%}" if s.efficiency is not None else "-"
    return [
        ("run", f"{timeline.run_id} ({timeline.task_name})"),
        ("shards", f"{s.shards}: {states or 'none started'}"),
        ("attempts", tries or "none"),
        ("workers", f"{len(timeline.lanes)} x {timeline.slots} slots"),
        ("wall time", _fmt_seconds(s.wall_seconds)),
        ("billed VM time", f"{_fmt_seconds(s.billed_vm_seconds)} ({s.billing_note})"),
        (
            "task time",
            f"{_fmt_seconds(s.task_seconds)}, committed {_fmt_seconds(s.committed_seconds)}",
        ),
        ("efficiency", f"{eff} of billed slot time went into committed attempts"),
        ("estimated cost", f"{cost} ({s.cost_note})"),
    ]


def draw_png(timeline: Timeline, path: Path) -> dict[str, Any]:
    """Draw the timeline to ``path``, in the format its suffix names (PNG, PDF, SVG); returns
    what was drawn (the sidecar's ``drawn``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = sum(lane.slots for lane in timeline.lanes)
    per_row = 0.35 if rows <= 40 else max(0.05, 14.0 / rows)  # a 2,000-row run stays readable
    fig, (ax, qax) = plt.subplots(
        2,
        1,
        figsize=(11, max(3.0, 1.2 + per_row * rows) + 1.6),
        sharex=True,
        gridspec_kw={"height_ratios": [max(per_row * rows / 0.35, 2), 1.6]},
        constrained_layout=True,
    )
    drawn = _draw_lanes(ax, timeline, rows)
    _draw_queue(qax, timeline)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _box(x: float, width: float, y0: float, y1: float) -> Box:
    return [(x, y0), (x + width, y0), (x + width, y1), (x, y1)]


def _draw_lanes(ax: Any, timeline: Timeline, rows: int) -> dict[str, Any]:
    row_of = _rows_of(timeline, rows)
    span = max([timeline.summary.wall_seconds, *(ln.billed_end for ln in timeline.lanes), 1e-9])
    many = len(timeline.lanes) > 40 or any(len(lane.bars) > 200 for lane in timeline.lanes)
    billed, boxes, bars_drawn = _lay_out_bars(ax, timeline, row_of, span, many)
    _fill_boxes(ax, billed, boxes, many)
    _set_lane_axes(ax, timeline, row_of, rows, span, many)
    legend = _title_and_legend(ax, timeline)
    return {
        "lanes": [lane.worker for lane in timeline.lanes],
        "rows": rows,
        "bars": bars_drawn,
        "legend": [str(p.get_label()) for p in legend],
        "queue_points": len(timeline.queue),
        "max_queue": max(d for _, d in timeline.queue),
    }


def _rows_of(timeline: Timeline, rows: int) -> dict[tuple[str, int], int]:
    """Each (worker, slot)'s row, counted from the top: the first lane's first slot is highest."""
    row_of: dict[tuple[str, int], int] = {}
    for lane in timeline.lanes:
        for slot in range(lane.slots):
            row_of[(lane.worker, slot)] = rows - 1 - len(row_of)
    return row_of


def _lay_out_bars(
    ax: Any, timeline: Timeline, row_of: dict[tuple[str, int], int], span: float, many: bool
) -> tuple[list[Box], dict[str, list[Box]], list[dict[str, Any]]]:
    """Each lane's billed box and each bar's box (by colour), labelling the bars with room for
    one; returns the billed boxes, the bar boxes and the sidecar's record of every bar."""
    billed: list[Box] = []
    boxes: dict[str, list[Box]] = {}  # colour -> rectangles
    bars_drawn = []
    for lane in timeline.lanes:
        top, bottom = row_of[(lane.worker, 0)], row_of[(lane.worker, lane.slots - 1)]
        billed.append(_box(lane.billed_start, lane.billed_seconds, bottom - 0.45, top + 0.45))
        for bar in lane.bars:
            y, colour = row_of[(lane.worker, bar.slot)], COLOURS[bar.outcome]
            width = max(bar.seconds, span * 1e-3)
            boxes.setdefault(colour, []).append(_box(bar.start, width, y - 0.35, y + 0.35))
            if not many and bar.seconds > span * 0.06 and len(lane.bars) < 60:  # room for a label
                _label_bar(ax, bar, y)
            bars_drawn.append(_bar_record(lane, bar, y, colour))
    return billed, boxes, bars_drawn


def _label_bar(ax: Any, bar: Bar, y: int) -> None:
    ax.text(
        bar.start + bar.seconds / 2,
        y,
        f"{bar.shard_id[:14]}#{bar.attempt}",
        ha="center",
        va="center",
        fontsize=7,
        color="white",
        zorder=3,
        clip_on=True,
    )


def _bar_record(lane: Lane, bar: Bar, y: int, colour: str) -> dict[str, Any]:
    return {
        "lane": lane.worker,
        "row": y,
        "slot": bar.slot,
        "shard": bar.shard_id,
        "attempt": bar.attempt,
        "start": bar.start,
        "width": bar.seconds,
        "outcome": bar.outcome,
        "colour": colour,
    }


def _fill_boxes(ax: Any, billed: list[Box], boxes: dict[str, list[Box]], many: bool) -> None:
    from matplotlib.collections import PolyCollection

    # One collection per colour, not an artist per bar: 100,000 attempts draw in seconds.
    ax.add_collection(PolyCollection(billed, facecolors=BILLED_COLOUR, zorder=1))
    for colour, rects in boxes.items():
        ax.add_collection(
            PolyCollection(
                rects,
                facecolors=colour,
                edgecolors="white",
                linewidths=0 if many else 0.5,
                zorder=2,
            )
        )


def _set_lane_axes(
    ax: Any,
    timeline: Timeline,
    row_of: dict[tuple[str, int], int],
    rows: int,
    span: float,
    many: bool,
) -> None:
    ax.set_xlim(-span * 0.02, span * 1.02)
    ax.set_yticks(
        [row_of[(lane.worker, 0)] for lane in timeline.lanes],
        labels=[
            lane.worker + (f"\n{lane.machine_type}" if lane.machine_type and not many else "")
            for lane in timeline.lanes
        ],
        fontsize=8 if not many else 5,
    )
    ax.set_ylim(-0.7, max(rows, 1) - 0.3)
    ax.grid(axis="x", alpha=0.3)


def _title_and_legend(ax: Any, timeline: Timeline) -> list[Any]:
    """The title (attempts per outcome) and the legend of the outcomes seen; returns the legend's
    patches."""
    from matplotlib.patches import Patch

    s = timeline.summary
    counts = {k: v for k, v in s.attempts.items() if v}
    ax.set_title(
        f"run {timeline.run_id} · {s.shards} shards · "
        + " · ".join(f"{v} {k}" for k, v in counts.items()),
        fontsize=10,
        loc="left",
    )
    legend = [Patch(color=COLOURS[o], label=o) for o in COLOURS if counts.get(o)]
    legend.append(Patch(color=BILLED_COLOUR, label="billed"))
    ax.legend(  # above the lanes, right of the title, so it hides no bar
        handles=legend,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        fontsize=8,
        ncols=len(legend),
        frameon=False,
        borderaxespad=0.2,
    )
    return legend


def _draw_queue(qax: Any, timeline: Timeline) -> None:
    s = timeline.summary
    times = [t for t, _ in timeline.queue]
    depths = [d for _, d in timeline.queue]
    end = max([s.wall_seconds, *times, *(lane.billed_end for lane in timeline.lanes)])
    qax.step([*times, end], [*depths, depths[-1]], where="post", color="#37474f")
    qax.fill_between([*times, end], [*depths, depths[-1]], step="post", alpha=0.2, color="#37474f")
    qax.set_ylabel("queued", fontsize=8)
    qax.set_xlabel("seconds since the run was submitted", fontsize=8)
    qax.set_ylim(0, max(max(depths), 1) * 1.15)
    qax.grid(alpha=0.3)
    eff = f"{s.efficiency:.0%}" if s.efficiency is not None else "-"
    cost = f"${s.estimated_cost:.4f}" if s.estimated_cost is not None else "cost -"
    qax.set_title(
        f"billed {_fmt_seconds(s.billed_vm_seconds)} · task {_fmt_seconds(s.task_seconds)}"
        f" · efficiency {eff} · {cost}",
        fontsize=9,
        loc="left",
    )


def html_page(timeline: Timeline, png: bytes) -> str:
    """A self-contained page: the summary table and the picture (base64 PNG)."""
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in summary_rows(timeline)
    )
    lanes = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(c))}</td>"
            for c in (
                lane.worker,
                lane.machine_type or "-",
                "Spot" if lane.spot else "standard",
                len(lane.bars),
                _fmt_seconds(lane.billed_seconds),
                lane.billing,
                f"${lane.cost:.4f}" if lane.cost is not None else "-",
            )
        )
        + "</tr>"
        for lane in timeline.lanes
    )
    image = base64.b64encode(png).decode()
    title = html.escape(f"CFlow run {timeline.run_id}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ text-align: left; padding: 3px 12px; border-bottom: 1px solid #ddd; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
</style></head><body>
<h1>{title}</h1>
<table>{rows}</table>
<img alt="timeline of run {html.escape(timeline.run_id)}" src="data:image/png;base64,{image}">
<h2>Workers</h2>
<table><tr><th>worker</th><th>machine type</th><th>pricing</th><th>attempts</th>
<th>billed</th><th>billed from</th><th>cost</th></tr>
{lanes}
</table>
</body></html>
"""
