"""Small server-rendered SVG charts for the dashboard: no script, no inline style (the CSP
allows neither), only SVG presentation attributes, every label escaped.

The outer <svg> has no viewBox: its user unit is the CSS pixel, so a label's font size is
what the reader sees at any width (a 640-unit viewBox drawn 340 px wide on a phone made 11
units 6 px). Horizontal positions are percentages of the chart's width; the plot itself is
an inner <svg> whose viewBox is stretched to its box (preserveAspectRatio="none"), its
strokes kept at their width by vector-effect="non-scaling-stroke"."""

from __future__ import annotations

import time
from typing import Any

from markupsafe import Markup, escape

FONT = 13  # CSS px: the page's small text (.kpis is .9rem of 15 px)
H, PAD_T, PAD_B = 200, 22, 30  # the progress chart: height, room for a label above the plot and the times below
PLOT_W = 1000  # the inner plot's viewBox width (stretched to the chart's width)
_STROKE = 'vector-effect="non-scaling-stroke"'


def time_labels(t0: float, t1: float) -> tuple[str, str]:
    """Labels for the two ends of a time axis, in the server's local time zone (named at the
    end): the date at the start, and at the end too when it falls on another day; seconds
    where both ends fall within one minute, so the two labels never read the same."""
    start, end = time.localtime(t0), time.localtime(t1)
    same_day = time.strftime("%Y-%m-%d", start) == time.strftime("%Y-%m-%d", end)
    clock = "%H:%M:%S" if time.strftime("%Y-%m-%d %H:%M", start) == time.strftime("%Y-%m-%d %H:%M", end) else "%H:%M"
    return (time.strftime(f"%Y-%m-%d {clock}", start),
            time.strftime(f"{clock} %Z" if same_day else f"%Y-%m-%d {clock} %Z", end))


def _text(x: str, y: float, label: Any, anchor: str = "start", fill: str = "#667085") -> str:
    return f'<text x="{x}" y="{y:.1f}" text-anchor="{anchor}" font-size="{FONT}" fill="{fill}">{escape(label)}</text>'


def progress_line(points: list[dict[str, float]], target: int) -> Markup:
    """Cumulative rankings over time against the project's target."""
    if not points:
        return Markup('<p class="muted">No rankings yet.</p>')
    t0, t1 = points[0]["t"], points[-1]["t"]
    now = points[-1]["n"]
    top = max(target, now, 1)
    span = max(t1 - t0, 1e-9)
    plot_h = H - PAD_T - PAD_B

    def y(n: float) -> float:  # in the plot's units, which are CSS px vertically
        return plot_h * (1 - n / top)

    path = " ".join(f"{'M' if i == 0 else 'L'}{PLOT_W * (p['t'] - t0) / span:.1f},{y(p['n']):.1f}" for i, p in enumerate(points))
    ty, ey = PAD_T + y(target), PAD_T + y(now)
    # The count at the line's end, under it (above it where that would reach the axis); the
    # target's label at the other end of its line, so the two never meet.
    count_y = ey + FONT + 3 if ey + FONT + 3 < H - PAD_B - 2 else ey - 6
    first, last = time_labels(t0, t1)
    parts = [
        f'<svg class="chart" id="progress-chart" width="100%" height="{H}" role="img" '
        f'aria-label="Rankings over time: {now} of {target}, {escape(first)} to {escape(last)}">',
        f'<svg x="0.5%" y="{PAD_T}" width="99%" height="{plot_h}" viewBox="0 0 {PLOT_W} {plot_h}" '
        f'preserveAspectRatio="none" overflow="visible">',
        f'<line x1="0" y1="{plot_h}" x2="{PLOT_W}" y2="{plot_h}" stroke="#98a2b3" {_STROKE}/>',
        f'<line x1="0" y1="0" x2="0" y2="{plot_h}" stroke="#98a2b3" {_STROKE}/>',
        f'<line x1="0" y1="{ty - PAD_T:.1f}" x2="{PLOT_W}" y2="{ty - PAD_T:.1f}" stroke="#067647" stroke-dasharray="4 3" {_STROKE}/>',
        f'<path d="{path}" fill="none" stroke="#2454d6" stroke-width="2.5" {_STROKE}/>',
        "</svg>",
        _text("1.5%", ty - 5, f"target {target}", fill="#067647"),
        _text("99%", count_y, f"{now}", "end", "#2454d6"),
        _text("0", H - 8, first),
        _text("100%", H - 8, last, "end"),
        "</svg>",
    ]
    return Markup("".join(parts))


def agreement_bars(annotators: list[dict[str, Any]]) -> Markup:
    """Per annotator: mean Kendall tau-b against each other annotator, -1..1, a bar each
    under the annotator's name, the value at the right."""
    rows = [a for a in annotators if a.get("tau_vs_others") is not None]
    if not rows:
        return Markup('<p class="muted">Agreement needs prompts ranked by two or more annotators.</p>')
    rows.sort(key=lambda a: a["tau_vs_others"])
    row_h, bar_top, bar_h = FONT + 23, FONT + 5, 12  # a row: the name's line, then its bar
    height = 4 + row_h * len(rows) + PAD_B
    parts = ['<svg class="chart" id="agreement-chart" width="100%" '
             f'height="{height}" role="img" aria-label="Agreement with the others per annotator">']
    for i, a in enumerate(rows):
        tau = max(-1.0, min(1.0, a["tau_vs_others"]))
        y = 4 + i * row_h
        x, w = (50.0, tau * 50) if tau >= 0 else (50 + tau * 50, -tau * 50)
        color = "#b42318" if tau < 0 else ("#f79009" if tau < 0.3 else "#2454d6")
        parts.append(_text("0", y + FONT, a["username"], fill="#1d2330"))
        # The zero line across the bar only: a long name on a narrow screen runs past the middle.
        parts.append(f'<line x1="50%" y1="{y + bar_top - 3}" x2="50%" y2="{y + bar_top + bar_h + 3}" stroke="#98a2b3"/>')
        parts.append(f'<rect x="{x:.2f}%" y="{y + bar_top}" width="{max(w, 0.2):.2f}%" height="{bar_h}" fill="{color}">'
                     f'<title>{escape(a["username"])}: tau {tau:.2f} over {a.get("shared_items", 0)} shared prompts</title></rect>')
        parts.append(_text("100%", y + FONT, f"{tau:+.2f}", "end"))
    axis_y = 4 + row_h * len(rows)
    parts += [_text("0", axis_y + 18, "-1 disagrees"),
              _text("50%", axis_y + 18, "0", "middle"),
              _text("100%", axis_y + 18, "agrees +1", "end"),
              "</svg>"]
    return Markup("".join(parts))
