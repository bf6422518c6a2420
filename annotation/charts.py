"""Small server-rendered SVG charts for the dashboard: no script, no inline style (the CSP
allows neither), only SVG presentation attributes, every label escaped."""

from __future__ import annotations

import time
from typing import Any

from markupsafe import Markup, escape

W, H, PAD_L, PAD_R, PAD_T, PAD_B = 640, 200, 48, 16, 12, 28


def progress_line(points: list[dict[str, float]], target: int) -> Markup:
    """Cumulative rankings over time against the project's target."""
    if not points:
        return Markup('<p class="muted">No rankings yet.</p>')
    t0, t1 = points[0]["t"], points[-1]["t"]
    top = max(target, points[-1]["n"], 1)
    span = max(t1 - t0, 1e-9)

    def xy(t: float, n: float) -> tuple[float, float]:
        return (PAD_L + (W - PAD_L - PAD_R) * (t - t0) / span, H - PAD_B - (H - PAD_T - PAD_B) * n / top)

    path = " ".join(f"{'M' if i == 0 else 'L'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(xy(p["t"], p["n"]) for p in points))
    _, ty = xy(t0, target)
    fmt = "%H:%M" if span < 86400 else "%m-%d %H:%M"
    parts = [
        f'<svg class="chart" id="progress-chart" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="Rankings over time: {points[-1]["n"]} of {target}">',
        f'<line x1="{PAD_L}" y1="{H - PAD_B}" x2="{W - PAD_R}" y2="{H - PAD_B}" stroke="#98a2b3"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{H - PAD_B}" stroke="#98a2b3"/>',
        f'<line x1="{PAD_L}" y1="{ty:.1f}" x2="{W - PAD_R}" y2="{ty:.1f}" stroke="#067647" stroke-dasharray="4 3"/>',
        f'<text x="{W - PAD_R}" y="{ty - 4:.1f}" text-anchor="end" font-size="11" fill="#067647">target {target}</text>',
        f'<path d="{path}" fill="none" stroke="#2454d6" stroke-width="2.5"/>',
        f'<text x="{PAD_L - 6}" y="{H - PAD_B}" text-anchor="end" font-size="11" fill="#667085">0</text>',
        f'<text x="{PAD_L - 6}" y="{PAD_T + 10}" text-anchor="end" font-size="11" fill="#667085">{top}</text>',
        f'<text x="{PAD_L}" y="{H - 8}" font-size="11" fill="#667085">{escape(time.strftime(fmt, time.localtime(t0)))}</text>',
        f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end" font-size="11" fill="#667085">'
        f'{escape(time.strftime(fmt, time.localtime(t1)))}</text>',
        "</svg>",
    ]
    return Markup("".join(parts))


def agreement_bars(annotators: list[dict[str, Any]]) -> Markup:
    """Per annotator: mean Kendall tau-b against the others' consensus, -1..1, a bar each."""
    rows = [a for a in annotators if a.get("tau_vs_consensus") is not None]
    if not rows:
        return Markup('<p class="muted">Agreement needs prompts ranked by two or more annotators.</p>')
    rows.sort(key=lambda a: a["tau_vs_consensus"])
    bar_h, label_w, width = 18, 120, W
    height = PAD_T + bar_h * len(rows) + PAD_B
    value_w = 44  # room for the number right of the bars
    half = (width - label_w - PAD_R - value_w) / 2
    zero = label_w + half
    parts = [f'<svg class="chart" id="agreement-chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="Agreement with the consensus per annotator">']
    for i, a in enumerate(rows):
        tau = max(-1.0, min(1.0, a["tau_vs_consensus"]))
        y = PAD_T + i * bar_h
        x, w = (zero, tau * half) if tau >= 0 else (zero + tau * half, -tau * half)
        color = "#b42318" if tau < 0 else ("#f79009" if tau < 0.3 else "#2454d6")
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" font-size="11" fill="#1d2330">'
                     f'{escape(a["username"])}</text>')
        parts.append(f'<rect x="{x:.1f}" y="{y + 3}" width="{max(w, 1):.1f}" height="{bar_h - 6}" fill="{color}">'
                     f'<title>{escape(a["username"])}: tau {tau:.2f} over {a.get("shared_items", 0)} shared prompts</title></rect>')
        parts.append(f'<text x="{width - PAD_R}" y="{y + 13}" text-anchor="end" font-size="11" fill="#667085">{tau:+.2f}</text>')
    axis_y = PAD_T + bar_h * len(rows)
    parts += [f'<line x1="{zero:.1f}" y1="{PAD_T}" x2="{zero:.1f}" y2="{axis_y}" stroke="#98a2b3"/>',
              f'<text x="{label_w}" y="{axis_y + 16}" font-size="11" fill="#667085">-1 disagrees</text>',
              f'<text x="{zero:.1f}" y="{axis_y + 16}" text-anchor="middle" font-size="11" fill="#667085">0</text>',
              f'<text x="{zero + half:.1f}" y="{axis_y + 16}" text-anchor="end" font-size="11" fill="#667085">agrees +1</text>',
              "</svg>"]
    return Markup("".join(parts))
