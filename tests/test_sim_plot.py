"""The simulation's SVG chart: well-formed, one line per series that the rows carry, one point per round."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from node.sim.plot import svg_chart

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
