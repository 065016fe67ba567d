"""The simulation's SVG charts: well-formed, one line per series that the rows carry, one point per round, a panel
against simulated time only when rows carry the clock; and the per-round timeline of what each edge node did."""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Any

from node.sim.plot import svg_chart, svg_timeline

SVG = "{http://www.w3.org/2000/svg}"


def test_each_series_in_the_rows_is_one_line_with_a_point_per_round() -> None:
    rows = [{"round": r, "accuracy": 0.5 + r / 10, "loss": 1.0 / r, "train_loss": 2.0 / r} for r in (1, 2, 3)]

    root = ET.fromstring(svg_chart(rows))

    lines = root.iter(f"{SVG}polyline")
    assert [len(line.attrib["points"].split()) for line in lines] == [3, 3, 3]   # accuracy, loss, train_loss
    labels = {t.text for t in root.iter(f"{SVG}text")}
    assert {"global", "global test", "clients' training"} <= labels and "personal (mean)" not in labels


def test_no_rows_give_empty_panels_not_an_error() -> None:
    root = ET.fromstring(svg_chart([]))

    assert list(root.iter(f"{SVG}polyline")) == []


# --- accuracy against simulated time ------------------------------------------------------------------------------

TIME_TITLE = "accuracy vs simulated time"

# svg_chart's output for these rows before simulated time existed: rows without sim_time_s must still give it.
ROWS_WITHOUT_SIM_TIME = [{"round": 1, "accuracy": 0.5, "loss": 1.0}, {"round": 2, "accuracy": 0.75, "loss": 0.5}]
SVG_WITHOUT_SIM_TIME = """\
<svg xmlns="http://www.w3.org/2000/svg" width="920" height="320" font-family="sans-serif">
<rect width="100%" height="100%" fill="white"/>
<g transform="translate(0,0)">
<text x="230.0" y="24" text-anchor="middle" font-size="15">accuracy</text>
<rect x="56" y="40" width="384" height="232" fill="none" stroke="#999"/>
<text x="248.0" y="310" text-anchor="middle" font-size="12">round</text>
<text x="56.0" y="288" text-anchor="middle" font-size="11">1</text>
<text x="440.0" y="288" text-anchor="middle" font-size="11">2</text>
<text x="50" y="276.0" text-anchor="end" font-size="11">0.5</text>
<text x="50" y="160.0" text-anchor="end" font-size="11">0.625</text>
<text x="50" y="44.0" text-anchor="end" font-size="11">0.75</text>
<polyline points="56.0,272.0 440.0,40.0" fill="none" stroke="#1f77b4" stroke-width="2"/>
<circle cx="56.0" cy="272.0" r="3" fill="#1f77b4"/>
<circle cx="440.0" cy="40.0" r="3" fill="#1f77b4"/>
<text x="64" y="56" font-size="12" fill="#1f77b4">global</text>
</g>
<g transform="translate(460,0)">
<text x="230.0" y="24" text-anchor="middle" font-size="15">loss</text>
<rect x="56" y="40" width="384" height="232" fill="none" stroke="#999"/>
<text x="248.0" y="310" text-anchor="middle" font-size="12">round</text>
<text x="56.0" y="288" text-anchor="middle" font-size="11">1</text>
<text x="440.0" y="288" text-anchor="middle" font-size="11">2</text>
<text x="50" y="276.0" text-anchor="end" font-size="11">0.5</text>
<text x="50" y="160.0" text-anchor="end" font-size="11">0.75</text>
<text x="50" y="44.0" text-anchor="end" font-size="11">1</text>
<polyline points="56.0,40.0 440.0,272.0" fill="none" stroke="#1f77b4" stroke-width="2"/>
<circle cx="56.0" cy="40.0" r="3" fill="#1f77b4"/>
<circle cx="440.0" cy="272.0" r="3" fill="#1f77b4"/>
<text x="64" y="56" font-size="12" fill="#1f77b4">global test</text>
</g>
</svg>
"""


def _texts(svg: str) -> list[str]:
    return [t.text or "" for t in ET.fromstring(svg).iter(f"{SVG}text")]


def test_rows_without_sim_time_give_the_same_svg_as_before() -> None:
    assert svg_chart(ROWS_WITHOUT_SIM_TIME) == SVG_WITHOUT_SIM_TIME


def test_rows_without_sim_time_have_no_simulated_time_panel() -> None:
    rows = [{**r, "sim_round_s": 30.0} for r in ROWS_WITHOUT_SIM_TIME]   # a round's duration alone is no clock

    assert TIME_TITLE not in _texts(svg_chart(rows))


def test_sim_time_in_any_row_adds_the_simulated_time_panel() -> None:
    rows = [*ROWS_WITHOUT_SIM_TIME, {"round": 3, "accuracy": 0.8, "loss": 0.4, "sim_time_s": 180.0}]

    root = ET.fromstring(svg_chart(rows))

    assert TIME_TITLE in [t.text for t in root.iter(f"{SVG}text")]
    assert len(root.findall(f"{SVG}g")) == 3 and root.attrib["width"] == "1380"


def test_simulated_time_panel_has_a_point_per_row_with_sim_time() -> None:
    rows = [{"round": r, "accuracy": 0.5 + r / 10, "loss": 1.0 / r, "sim_time_s": 61.0 * r} for r in (1, 2, 3)]
    rows.append({"round": 4, "accuracy": 0.95, "loss": 0.2})                      # no clock: not on the time axis

    panels = ET.fromstring(svg_chart(rows)).findall(f"{SVG}g")
    time_panel = next(g for g in panels if TIME_TITLE in [t.text for t in g.iter(f"{SVG}text")])

    assert [len(p.attrib["points"].split()) for p in time_panel.iter(f"{SVG}polyline")] == [3]


def test_simulated_time_axis_of_minutes_is_labelled_in_minutes() -> None:
    rows = [{"round": r, "accuracy": 0.5 + r / 100, "loss": 1.0, "sim_time_s": 61.3 * r} for r in range(1, 13)]

    texts = _texts(svg_chart(rows))

    assert "simulated time (min)" in texts
    assert {"0 min", "5 min", "10 min"} <= set(texts)


def test_simulated_time_axis_of_seconds_is_labelled_in_seconds() -> None:
    rows = [{"round": r, "accuracy": 0.5, "loss": 1.0, "sim_time_s": 9.5 * r} for r in (1, 2, 3)]

    texts = _texts(svg_chart(rows))

    assert "simulated time (s)" in texts and "20 s" in texts


def test_simulated_time_axis_of_hours_is_labelled_in_hours() -> None:
    rows = [{"round": r, "accuracy": 0.5, "loss": 1.0, "sim_time_s": 3600.0 * r} for r in (1, 2, 3, 4)]

    texts = _texts(svg_chart(rows))

    assert "simulated time (h)" in texts and "2 h" in texts


# --- the per-round timeline ---------------------------------------------------------------------------------------

def _edge(index: int, status: str = "trained", reason: str | None = None, down: float = 2.0, compute: float = 40.0,
          up: float = 3.0, finish: float | None = None) -> dict[str, Any]:
    return {"edge": f"client-{index:03d}", "index": index, "sn": 1, "status": status, "reason": reason,
            "down_s": down, "compute_s": compute, "up_s": up,
            "finish_s": down + compute + up if finish is None else finish}


def _round(number: int, start: float, edges: list[dict[str, Any]], deadline: float | None = 60.0) -> dict[str, Any]:
    return {"round": number, "start_s": start, "round_s": 61.2, "deadline_s": deadline, "edges": edges}


def _lane_labels(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "lane"]


def _marker_titles(root: ET.Element, cls: str) -> list[str]:
    """The tooltips of the vertical lines of class ``cls`` ("rnd": round starts, "ddl": deadlines); the legend's
    samples have none."""
    titles = (line.find(f"{SVG}title") for line in root.iter(f"{SVG}line") if line.attrib.get("class") == cls)
    return [t.text for t in titles if t is not None and t.text]


def _bar_groups(root: ET.Element) -> dict[str, ET.Element]:
    """Each (edge, round)'s group of bars, by the first words of its tooltip: "client-003, round 4"."""
    groups = {}
    for g in root.iter(f"{SVG}g"):
        title = g.find(f"{SVG}title")
        if title is not None and title.text:
            groups[title.text.split(":")[0]] = g
    return groups


def test_timeline_has_one_lane_label_per_edge_by_index() -> None:
    timeline = [_round(1, 0.0, [_edge(4), _edge(1)]), _round(2, 61.2, [_edge(2), _edge(4)])]

    root = ET.fromstring(svg_timeline(timeline))

    assert _lane_labels(root) == ["1 client-001", "2 client-002", "4 client-004"]


def test_timeline_lanes_are_the_max_rows_edges_selected_most_often() -> None:
    timeline = [_round(1, 0.0, [_edge(0), _edge(1), _edge(2), _edge(3)]),
                _round(2, 61.2, [_edge(3), _edge(2), _edge(4)]),
                _round(3, 122.4, [_edge(3), _edge(4)])]                        # selected: 3 x3, 2 and 4 x2, 0 and 1 x1

    root = ET.fromstring(svg_timeline(timeline, max_rows=3))

    assert _lane_labels(root) == ["2 client-002", "3 client-003", "4 client-004"]


def test_timeline_notes_how_many_edges_were_left_out() -> None:
    timeline = [_round(1, 0.0, [_edge(i) for i in range(5)])]

    texts = _texts(svg_timeline(timeline, max_rows=2))

    assert any(t.startswith("3 of 5 edge nodes not shown") for t in texts)


def test_timeline_with_every_edge_shown_has_no_note() -> None:
    texts = _texts(svg_timeline([_round(1, 0.0, [_edge(i) for i in range(5)])], max_rows=5))

    assert not any("not shown" in t for t in texts)


def test_dropped_edge_tooltip_names_edge_round_status_and_reason() -> None:
    reason = "misses the deadline (finishes at 75.1 s)"
    timeline = [_round(4, 812.5, [_edge(3, "dropped", reason, compute=69.8, finish=75.1), _edge(5)])]

    titles = [t.text or "" for t in ET.fromstring(svg_timeline(timeline)).iter(f"{SVG}title")]

    assert any(t.startswith("client-003, round 4: dropped") and reason in t for t in titles)


def test_timeline_text_is_escaped() -> None:
    reason = 'offline <at> "30 s" & gone'
    timeline = [_round(1, 0.0, [_edge(1, "dropped", reason, finish=30.0)])]

    titles = [t.text or "" for t in ET.fromstring(svg_timeline(timeline)).iter(f"{SVG}title")]

    assert any(reason in t for t in titles)


def test_timeline_has_a_round_marker_and_number_per_round() -> None:
    timeline = [_round(r, 61.2 * (r - 1), [_edge(1)]) for r in (1, 2, 3)]

    root = ET.fromstring(svg_timeline(timeline))

    assert [t.split(" starts")[0] for t in _marker_titles(root, "rnd")] == ["round 1", "round 2", "round 3"]
    assert [t.text for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "round"] == ["1", "2", "3"]


def test_timeline_has_a_dashed_line_per_round_with_a_deadline() -> None:
    timeline = [_round(1, 0.0, [_edge(1)]), _round(2, 61.2, [_edge(1)], deadline=None), _round(3, 122.4, [_edge(1)])]

    root = ET.fromstring(svg_timeline(timeline))

    assert [t.split(" deadline")[0] for t in _marker_titles(root, "ddl")] == ["round 1", "round 3"]


def _bars(group: ET.Element) -> list[tuple[str, float, float]]:
    """(class, left, right) of each bar in a group."""
    return [(r.attrib["class"], float(r.attrib["x"]), float(r.attrib["x"]) + float(r.attrib["width"]))
            for r in group.iter(f"{SVG}rect")]


def test_trained_edge_is_download_compute_upload_end_to_end() -> None:
    root = ET.fromstring(svg_timeline([_round(1, 0.0, [_edge(1, down=2.0, compute=40.0, up=3.0)])]))

    bars = _bars(_bar_groups(root)["client-001, round 1"])

    assert [c for c, _, _ in bars] == ["d", "c", "u"]
    assert abs(bars[0][2] - bars[1][1]) < 0.2 and abs(bars[1][2] - bars[2][1]) < 0.2


def test_edge_dropped_midway_is_hatched_up_to_its_finish() -> None:
    timeline = [_round(1, 0.0, [_edge(1), _edge(2, "dropped", "offline at 30.2 s", down=2.1, compute=40.0, up=3.3,
                                                finish=30.2)])]

    bars = _bars(_bar_groups(ET.fromstring(svg_timeline(timeline)))["client-002, round 1"])

    assert [c for c, _, _ in bars] == ["xd", "xc"]                              # the upload never started
    start = bars[0][1]
    assert abs((bars[1][2] - start) / (bars[0][2] - start) - 30.2 / 2.1) < 0.5   # compute stops at 30.2 s


def test_edge_offline_at_round_start_is_a_cross() -> None:
    offline = _edge(2, "dropped", "offline at round start", down=0.0, compute=0.0, up=0.0, finish=0.0)

    group = _bar_groups(ET.fromstring(svg_timeline([_round(1, 0.0, [_edge(1), offline])])))["client-002, round 1"]

    assert [p.attrib["class"] for p in group.iter(f"{SVG}path")] == ["off"] and _bars(group) == []


def test_empty_timeline_is_an_svg_saying_no_rounds() -> None:
    assert "no rounds" in _texts(svg_timeline([]))


def test_timeline_of_100_rounds_and_130_edges_draws_60_lanes() -> None:
    rounds = [_round(r, 61.2 * (r - 1), [_edge(i, compute=10.0 + (i * r) % 45) for i in range(130)])
              for r in range(1, 101)]

    began = time.perf_counter()
    svg = svg_timeline(rounds)
    print(f"svg_timeline, 100 rounds x 130 edges: {time.perf_counter() - began:.3f} s, {len(svg) / 1e6:.1f} MB")

    root = ET.fromstring(svg)
    assert _lane_labels(root) == [f"{i} client-{i:03d}" for i in range(60)]   # all selected equally: lowest indexes


def test_timeline_leaves_out_a_deadline_beyond_the_last_round_and_keeps_the_axis_on_the_rounds() -> None:
    timeline = [_round(1, 0.0, [_edge(1)], deadline=600.0)]   # the round takes 61.2 s; its deadline is 10 min

    svg = svg_timeline(timeline)

    assert _marker_titles(ET.fromstring(svg), "ddl") == []
    assert "simulated time (s)" in svg   # an axis of about a minute, not ten
