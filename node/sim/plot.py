"""The simulation's accuracy and loss per round as an SVG line chart: written directly, in milliseconds, so a run
does not pay for importing a plotting library (about half a second) at its end."""
from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT = 460, 320          # one panel, in px
MARGIN = (56, 20, 40, 48)         # left, right, top, bottom
COLOURS = ("#1f77b4", "#ff7f0e")

PANELS = (("accuracy", (("accuracy", "global"), ("personal_accuracy_mean", "personal (mean)"))),
          ("loss", (("loss", "global test"), ("train_loss", "clients' training"))))


def _panel(x0: int, title: str, rows: Sequence[dict[str, Any]], series: Sequence[tuple[str, str]]) -> list[str]:
    left, right, top, bottom = MARGIN
    width, height = WIDTH - left - right, HEIGHT - top - bottom
    drawn = [(key, label) for key, label in series if any(key in r for r in rows)]
    xs = [r["round"] for r in rows]
    values = [float(r[key]) for r in rows for key, _ in drawn if key in r]
    out = [f'<g transform="translate({x0},0)">',
           f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>',
           f'<text x="{left + width / 2}" y="{HEIGHT - 10}" text-anchor="middle" font-size="12">round</text>']
    if not xs or not values:
        return [*out, "</g>"]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(values), max(values)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def px(x: float) -> float:
        return left + (x - x_lo) / ((x_hi - x_lo) or 1) * width

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * height

    for x in (x_lo, x_hi):
        out.append(f'<text x="{px(x):.1f}" y="{top + height + 16}" text-anchor="middle" font-size="11">{x}</text>')
    for y in (y_lo, (y_lo + y_hi) / 2, y_hi):
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.3g}</text>')
    for i, (key, label) in enumerate(drawn):
        colour = COLOURS[i % len(COLOURS)]
        points = [(px(r["round"]), py(float(r[key]))) for r in rows if key in r]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in points]
        out.append(f'<text x="{left + 8}" y="{top + 16 + 16 * i}" font-size="12" fill="{colour}">{escape(label)}'
                   "</text>")
    return [*out, "</g>"]


def svg_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Two panels side by side: accuracy (global, personalised mean) and loss (global test, clients' training)."""
    body = [line for i, (title, series) in enumerate(PANELS) for line in _panel(i * WIDTH, title, rows, series)]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * WIDTH}" height="{HEIGHT}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")
