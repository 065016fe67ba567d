"""The simulation's charts as SVG: accuracy and loss per round (and against simulated time), and a per-round timeline
of what each edge node did. Written directly, in milliseconds, so a run does not pay for importing a plotting library
(about half a second) at its end."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT = 460, 320          # one panel, in px
MARGIN = (56, 20, 40, 48)         # left, right, top, bottom
COLOURS = ("#1f77b4", "#ff7f0e")

PANELS = (("accuracy", (("accuracy", "global"), ("personal_accuracy_mean", "personal (mean)"))),
          ("loss", (("loss", "global test"), ("train_loss", "clients' training"))))
TIME_TITLE = "accuracy vs simulated time"

Ticks = list[tuple[float, str]]   # (value on the axis, its label)


def _time_unit(span_s: float) -> tuple[str, float]:
    """The unit that keeps tick labels short for a span of simulated seconds: (name, seconds per unit)."""
    if span_s <= 120:
        return "s", 1.0
    return ("min", 60.0) if span_s <= 7200 else ("h", 3600.0)


def _time_ticks(lo: float, hi: float, max_ticks: int = 6) -> tuple[str, float, Ticks]:
    """Round-numbered ticks (1, 2 or 5 times a power of ten, in the unit) between ``lo`` and ``hi`` seconds:
    (unit name, step in seconds, ticks labelled like ``12 min``)."""
    hi = max(hi, lo + 1e-3)
    unit, per = _time_unit(hi - lo)
    raw = max(hi - lo, 1e-9) / per / max_ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step_units = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    decimals = max(0, -math.floor(math.log10(step_units) + 1e-9))
    step = step_units * per
    ticks = [(k * step, f"{k * step_units:.{decimals}f} {unit}")
             for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    return unit, step, ticks


def _panel(x0: int, title: str, rows: Sequence[dict[str, Any]], series: Sequence[tuple[str, str]],
           x_key: str = "round", x_label: str = "round", x_axis: tuple[float, float, Ticks] | None = None) -> list[str]:
    """One panel: a line per series in ``series`` against ``x_key``; ``x_axis`` (lo, hi, ticks) defaults to the
    first and last value of ``x_key``."""
    left, right, top, bottom = MARGIN
    width, height = WIDTH - left - right, HEIGHT - top - bottom
    drawn = [(key, label) for key, label in series if any(key in r for r in rows)]
    xs = [r[x_key] for r in rows]
    values = [float(r[key]) for r in rows for key, _ in drawn if key in r]
    out = [f'<g transform="translate({x0},0)">',
           f'<text x="{WIDTH / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>',
           f'<text x="{left + width / 2}" y="{HEIGHT - 10}" text-anchor="middle" font-size="12">{escape(x_label)}'
           '</text>']
    if not xs or not values:
        return [*out, "</g>"]
    x_lo, x_hi, ticks = x_axis or (min(xs), max(xs), [(min(xs), f"{min(xs)}"), (max(xs), f"{max(xs)}")])
    y_lo, y_hi = min(values), max(values)
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5

    def px(x: float) -> float:
        return left + (x - x_lo) / ((x_hi - x_lo) or 1) * width

    def py(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * height

    for x, text in ticks:
        out.append(f'<text x="{px(x):.1f}" y="{top + height + 16}" text-anchor="middle" font-size="11">{text}</text>')
    for y in (y_lo, (y_lo + y_hi) / 2, y_hi):
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.3g}</text>')
    for i, (key, label) in enumerate(drawn):
        colour = COLOURS[i % len(COLOURS)]
        points = [(px(r[x_key]), py(float(r[key]))) for r in rows if key in r]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>' for x, y in points]
        out.append(f'<text x="{left + 8}" y="{top + 16 + 16 * i}" font-size="12" fill="{colour}">{escape(label)}'
                   "</text>")
    return [*out, "</g>"]


def svg_chart(rows: Sequence[dict[str, Any]]) -> str:
    """Panels side by side: accuracy (global, personalised mean) per round; when any row carries ``sim_time_s``, the
    same accuracy against simulated time (the clock at each round's end); and loss (global test, clients' training)."""
    timed = [r for r in rows if r.get("sim_time_s") is not None]
    (acc_title, acc_series), (loss_title, loss_series) = PANELS
    panels = [_panel(0, acc_title, rows, acc_series)]
    if timed:
        x_hi = max(max(float(r["sim_time_s"]) for r in timed), 0.0) or 1.0
        unit, step, _ = _time_ticks(0.0, x_hi)
        x_hi = math.ceil(x_hi / step - 1e-9) * step            # end the axis on a tick
        _, _, ticks = _time_ticks(0.0, x_hi)
        panels.append(_panel(WIDTH, TIME_TITLE, timed, acc_series, "sim_time_s", f"simulated time ({unit})",
                             (0.0, x_hi, ticks)))
    panels.append(_panel(len(panels) * WIDTH, loss_title, rows, loss_series))
    body = [line for panel in panels for line in panel]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(panels) * WIDTH}" height="{HEIGHT}" '
            f'font-family="sans-serif">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


# The timeline: one lane per edge node, one group of bars per (edge, round).
TL_WIDTH, TL_LEFT, TL_RIGHT = 1000, 120, 20   # px; the left margin holds the lane labels
TL_TOP, LANE = 78, 14                          # px above the first lane; px per lane
PHASES = (("down_s", "download", "d", "#6baed6", "#d9d9d9"),   # (key, label, CSS class, colour, dropped's grey)
          ("compute_s", "compute", "c", "#fd8d3c", "#bdbdbd"),
          ("up_s", "upload", "u", "#74c476", "#a3a3a3"))
TL_STYLE = ("<style>" + "".join(f".{c}{{fill:{colour}}}.x{c}{{fill:url(#h{c})}}" for _, _, c, colour, _ in PHASES)
            + ".off{stroke:#d62728;stroke-width:1.5}.rnd{stroke:#555;stroke-width:0.6}"
            ".ddl{stroke:#d62728;stroke-width:0.8;stroke-dasharray:4 3}text{font-size:10px}</style>")


def _svg_open(height: int) -> list[str]:
    """The timeline's opening lines: a dropped phase's hatch patterns and the classes bars are drawn with."""
    hatches = "".join(f'<pattern id="h{c}" patternUnits="userSpaceOnUse" width="4" height="4" '
                      f'patternTransform="rotate(45)"><rect width="4" height="4" fill="{grey}"/>'
                      f'<line x1="0" y1="0" x2="0" y2="4" stroke="#666" stroke-width="1"/></pattern>'
                      for _, _, c, _, grey in PHASES)
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{TL_WIDTH}" height="{height}" font-family="sans-serif">',
            f"<defs>{hatches}</defs>{TL_STYLE}", '<rect width="100%" height="100%" fill="white"/>']


def _lanes(timeline: Sequence[dict[str, Any]], max_rows: int) -> tuple[list[tuple[int, str]], int]:
    """The lanes to draw, (index, edge name) by index: the edges selected in most rounds, ties to the lower index;
    and how many edges were left out."""
    count: Counter[int] = Counter()
    names: dict[int, str] = {}
    for rnd in timeline:
        for e in rnd.get("edges") or ():
            count[e["index"]] += 1
            names.setdefault(e["index"], str(e.get("edge", f"#{e['index']}")))
    chosen = sorted(count, key=lambda i: (-count[i], i))[:max(max_rows, 0)]
    return [(i, names[i]) for i in sorted(chosen)], len(count) - len(chosen)


def _legend(y: int) -> list[str]:
    """One line: the trained phases' colours, the dropped phases' hatching, the cross, the round and deadline lines."""
    out, x = [], TL_LEFT
    for _, label, c, _, _ in PHASES:
        out.append(f'<rect x="{x}" y="{y - 9}" width="14" height="10" class="{c}"/><text x="{x + 18}" y="{y}">{label}'
                   "</text>")
        x += 82
    out += [f'<rect x="{x + 15 * i}" y="{y - 9}" width="14" height="10" class="x{c}"/>'
            for i, (_, _, c, _, _) in enumerate(PHASES)]
    x += 48
    out.append(f'<text x="{x}" y="{y}">dropped (up to where it stopped)</text>'
               f'<path d="M{x + 172} {y - 8}l6 6m0 -6l-6 6" class="off"/><text x="{x + 182}" y="{y}">'
               f'offline at round start</text><line x1="{x + 300}" y1="{y - 10}" x2="{x + 300}" y2="{y + 2}" '
               f'class="rnd"/><text x="{x + 304}" y="{y}">round start</text><line x1="{x + 370}" y1="{y - 10}" '
               f'x2="{x + 370}" y2="{y + 2}" class="ddl"/><text x="{x + 374}" y="{y}">deadline</text>')
    return out


def _bars(e: dict[str, Any], rnd: dict[str, Any], x_of: Callable[[float], float], y: float) -> str:
    """One edge's round: its phases as consecutive bars (a dropped edge's hatched grey, cut at its finish and at the
    round's end; a cross at the round start when nothing ran), under one tooltip."""
    start, round_s = float(rnd.get("start_s") or 0.0), float(rnd.get("round_s") or 0.0)
    trained = e.get("status") == "trained"
    lengths = [max(float(e.get(key) or 0.0), 0.0) for key, *_ in PHASES]
    limit = math.inf
    if not trained:
        finish = e.get("finish_s")
        limit = min(sum(lengths) if finish is None else float(finish), round_s if round_s > 0 else math.inf)
    reason = e.get("reason")
    tip = (f"{e.get('edge', e['index'])}, round {rnd.get('round')}: {e.get('status')}"
           + (f" ({reason})" if reason else "")
           + "; " + ", ".join(f"{p[1]} {v:.1f} s" for p, v in zip(PHASES, lengths, strict=True)))
    out = [f"<g><title>{escape(tip)}</title>"]
    t = 0.0
    for length, (_, _, c, _, _) in zip(lengths, PHASES, strict=True):
        end = min(t + length, limit)
        if end > t:
            x0 = x_of(start + t)
            out.append(f'<rect x="{x0:.1f}" y="{y + 2:.1f}" width="{max(x_of(start + end) - x0, 0.5):.1f}" '
                       f'height="{LANE - 4}" class="{"" if trained else "x"}{c}"/>')
        t += length
    if len(out) == 1:                      # nothing ran: offline at round start (or an instant round)
        out.append(f'<path d="M{x_of(start) - 3:.1f} {y + 4:.1f}l6 6m0 -6l-6 6" class="off"/>' if not trained else
                   f'<rect x="{x_of(start):.1f}" y="{y + 2:.1f}" width="0.5" height="{LANE - 4}" class="c"/>')
    return "".join(out) + "</g>"


def svg_timeline(timeline: Sequence[dict[str, Any]], max_rows: int = 60) -> str:
    """Each round of ``timeline`` on one simulated-time axis: a lane per edge node (at most ``max_rows``, those
    selected most often), its download, compute and upload as consecutive bars, a thin line and the round number at
    each round's start, a dashed line at its deadline; every bar's tooltip names edge, round, status and reason."""
    if not timeline:
        return "\n".join([*_svg_open(60), '<text x="500" y="34" text-anchor="middle" font-size="14">no rounds</text>',
                          "</svg>"]) + "\n"
    lanes, left_out = _lanes(timeline, max_rows)
    row_of = {index: i for i, (index, _) in enumerate(lanes)}
    bottom = TL_TOP + LANE * len(lanes)
    height = bottom + (62 if left_out else 44)
    lo = min(float(r.get("start_s") or 0.0) for r in timeline)
    # The axis ends with the rounds: a deadline far beyond them would squash the bars (it is drawn when inside).
    hi = max(float(r.get("start_s") or 0.0) + max([float(r.get("round_s") or 0.0),
                                                  *(float(e.get("finish_s") or 0.0) for e in r.get("edges") or ()
                                                    if e.get("status") == "trained")])
             for r in timeline)
    hi = max(hi, lo + 1e-3)
    span = TL_WIDTH - TL_LEFT - TL_RIGHT

    def x_of(t: float) -> float:
        return TL_LEFT + (t - lo) / (hi - lo) * span

    n_edges = len(lanes) + left_out
    out = _svg_open(height)
    out.append(f'<text x="{TL_WIDTH / 2}" y="18" text-anchor="middle" style="font-size:14px">per-round timeline: '
               f'{len(timeline)} round{"s" * (len(timeline) != 1)}, {n_edges} edge node{"s" * (n_edges != 1)}</text>')
    out += _legend(38)
    out += [f'<rect x="{TL_LEFT}" y="{TL_TOP + LANE * i}" width="{span}" height="{LANE}" fill="#f4f4f4"/>'
            for i in range(1, len(lanes), 2)]
    out += [f'<text x="{TL_LEFT - 6}" y="{TL_TOP + LANE * i + 10}" text-anchor="end" class="lane">'
            f"{index} {escape(name if len(name) <= 10 else name[:9] + '…')}<title>edge {index}: {escape(name)}"
            "</title></text>" for i, (index, name) in enumerate(lanes)]
    last_label = -math.inf
    for rnd in timeline:
        start = float(rnd.get("start_s") or 0.0)
        x = x_of(start)
        out.append(f'<line x1="{x:.1f}" y1="{TL_TOP - 4}" x2="{x:.1f}" y2="{bottom}" class="rnd"><title>round '
                   f'{escape(str(rnd.get("round")))} starts at {start:.1f} s</title></line>')
        if x - last_label >= 22:          # label as many round starts as fit without overlapping
            out.append(f'<text x="{x:.1f}" y="{TL_TOP - 7}" text-anchor="middle" class="round">'
                       f'{escape(str(rnd.get("round")))}</text>')
            last_label = x
        if rnd.get("deadline_s") is not None and start + float(rnd["deadline_s"]) <= hi:
            xd = x_of(start + float(rnd["deadline_s"]))
            out.append(f'<line x1="{xd:.1f}" y1="{TL_TOP}" x2="{xd:.1f}" y2="{bottom}" class="ddl"><title>round '
                       f'{escape(str(rnd.get("round")))} deadline: {float(rnd["deadline_s"]):.1f} s</title></line>')
        out += [_bars(e, rnd, x_of, TL_TOP + LANE * row_of[e["index"]])
                for e in rnd.get("edges") or () if e["index"] in row_of]
    unit, _, ticks = _time_ticks(lo, hi, 8)
    out.append(f'<line x1="{TL_LEFT}" y1="{bottom}" x2="{TL_LEFT + span}" y2="{bottom}" stroke="#999"/>')
    out += [f'<text x="{x_of(t):.1f}" y="{bottom + 14}" text-anchor="middle">{label}</text>' for t, label in ticks]
    out.append(f'<text x="{TL_LEFT + span / 2}" y="{bottom + 32}" text-anchor="middle" style="font-size:12px">'
               f"simulated time ({unit})</text>")
    if left_out:
        out.append(f'<text x="{TL_LEFT}" y="{bottom + 52}" class="note">{left_out} of {n_edges} edge nodes not shown: '
                   f"the lanes are the {len(lanes)} selected in the most rounds</text>")
    return "\n".join([*out, "</svg>"]) + "\n"
