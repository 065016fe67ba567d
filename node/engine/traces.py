"""Availability and device traces for simulated edges: their CSV/JSON files (FedScale's: node.engine.fedscale)."""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICE_COLUMNS = ("gflops", "sample_ms", "up_mbps", "down_mbps", "rtt_ms")
AVAILABILITY_HEADER = ["edge", "start_s", "end_s"]
EDGE_PATTERN = re.compile(r"[0-9]+")


class TraceError(ValueError):
    """A trace file is unreadable or malformed; the message names the file (and line) and what to fix."""


# --- availability -----------------------------------------------------------------------------------------------

Interval = tuple[float, float]


@dataclass(frozen=True)
class AvailabilityTrace:
    """When each edge is online. An edge the trace has no rows for is not constrained by it (see has())."""

    intervals: dict[int, tuple[Interval, ...]]   # edge -> sorted, disjoint, non-touching [start_s, end_s)
    period_s: float | None = None                 # set: the trace repeats, time t is looked up at t mod period_s
    edge_period_s: dict[int, float] = field(default_factory=dict)   # per-edge period overriding period_s
    _starts: dict[int, list[float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for edge, spans in self.intervals.items():
            period = self.period_of(edge)
            for (_, end0), (start1, _) in zip(spans, spans[1:], strict=False):
                if not start1 > end0:
                    raise ValueError(f"edge {edge}: intervals must be sorted, disjoint and not touching")
            for start, end in spans:
                if not 0 <= start < end or (period is not None and end > period):
                    raise ValueError(f"edge {edge}: bad interval [{start}, {end}) for period {period}")
        object.__setattr__(self, "_starts", {edge: [s for s, _ in spans] for edge, spans in self.intervals.items()})

    def has(self, edge: int) -> bool:
        return edge in self.intervals

    def period_of(self, edge: int) -> float | None:
        return self.edge_period_s.get(edge, self.period_s)

    def _index(self, edge: int, t: float) -> int:
        """The index of the interval holding t (already reduced by the period), or -1."""
        i = bisect.bisect_right(self._starts[edge], t) - 1
        return i if i >= 0 and t < self.intervals[edge][i][1] else -1

    def online(self, edge: int, t: float) -> bool:
        if edge not in self.intervals:
            return True
        period = self.period_of(edge)
        return self._index(edge, t % period if period is not None else t) >= 0

    def offline_at(self, edge: int, t0: float, t1: float) -> float | None:
        """The first time in [t0, t1) at which the edge is offline, or None if it is online throughout."""
        if t1 <= t0 or edge not in self.intervals:
            return None
        spans, period = self.intervals[edge], self.period_of(edge)
        if period is None:
            i = self._index(edge, t0)
            first = t0 if i < 0 else spans[i][1]
        else:
            u = t0 % period
            i = self._index(edge, u)
            if i < 0:
                return t0
            base = t0 - u                               # the start of t0's period
            if spans[i][1] < period:
                first = base + spans[i][1]
            elif spans[0][0] > 0:                       # online to the wrap, offline right after it
                first = base + period
            elif i == 0:                                # one interval [0, period): always online
                return None
            else:                                       # online across the wrap into the first interval
                first = base + period + spans[0][1]
            first = max(first, t0)
            for _ in range(4):                          # float rounding of base + end may land a hair early
                if first >= t1 or not self.online(edge, first):
                    break
                first = math.nextafter(first, math.inf)
        return first if first < t1 else None


def merge_intervals(spans: list[Interval]) -> tuple[Interval, ...]:
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


def load_availability(path: str | Path) -> AvailabilityTrace:
    """Read an availability trace: CSV (edge,start_s,end_s; no period) or JSON ({"period_s", "edges"})."""
    text = _read_text(path)
    if _is_json(path, text):
        return _availability_json(path, text)
    rows = _csv_rows(path, text)
    header = next(rows, None)
    if header is None or header[1] != AVAILABILITY_HEADER:
        raise TraceError(f"{path}: the first line must be exactly {','.join(AVAILABILITY_HEADER)}")
    spans: dict[int, list[Interval]] = {}
    for line, cells in rows:
        if len(cells) != 3:
            raise TraceError(f"{path}: line {line}: expected 3 cells (edge,start_s,end_s), got {len(cells)}")
        where = f"{path}: line {line}"
        edge = _edge(where, cells[0])
        start, end = _number(where, "start_s", cells[1]), _number(where, "end_s", cells[2])
        spans.setdefault(edge, []).append(_interval(where, start, end, None))
    return AvailabilityTrace({edge: merge_intervals(s) for edge, s in sorted(spans.items())})


def _availability_json(path: str | Path, text: str) -> AvailabilityTrace:
    data = _json_object(path, text, {"period_s", "edges", "edge_period_s"}, required={"edges"})
    period = None if data.get("period_s") is None else positive(f"{path}: period_s", data["period_s"])
    edge_periods = {
        _edge(f"{path}: edge_period_s", key): positive(f"{path}: edge_period_s[{key!r}]", value)
        for key, value in _json_map(path, "edge_period_s", data.get("edge_period_s", {})).items()}
    intervals: dict[int, tuple[Interval, ...]] = {}
    for key, value in _json_map(path, "edges", data["edges"]).items():
        edge = _edge(f"{path}: edges", key)
        where = f"{path}: edges[{key!r}]"
        if edge in intervals:
            raise TraceError(f"{where}: edge {edge} again under another spelling; keep one entry per edge")
        own = edge_periods.get(edge, period)
        if not isinstance(value, list) or not all(isinstance(v, list) and len(v) == 2 for v in value):
            raise TraceError(f"{where}: must be a list of [start_s, end_s] pairs")
        intervals[edge] = merge_intervals([_interval(where, json_number(where, s), json_number(where, e), own)
                                  for s, e in value])
    if unknown := sorted(set(edge_periods) - set(intervals)):
        raise TraceError(f"{path}: edge_period_s names edges {unknown} that have no intervals under edges")
    return AvailabilityTrace(dict(sorted(intervals.items())), period, edge_periods)


def _interval(where: str, start: float, end: float, period: float | None) -> Interval:
    if start < 0 or end < 0:
        raise TraceError(f"{where}: times must be >= 0, got [{start}, {end}]")
    if not end > start:
        raise TraceError(f"{where}: end_s {end} must be greater than start_s {start}")
    if period is not None and end > period:
        raise TraceError(f"{where}: interval [{start}, {end}] goes beyond period_s {period}; split it at the wrap")
    return (start, end)


def write_availability_json(path: str | Path, trace: AvailabilityTrace) -> None:
    """Write a trace as JSON that load_availability reads back equal: sorted edges, one edge a line."""
    lines = ["{", f'  "period_s": {json.dumps(_num(trace.period_s))},']
    if trace.edge_period_s:
        periods = ", ".join(f'"{e}": {_num(p)!r}' for e, p in sorted(trace.edge_period_s.items()))
        lines.append(f'  "edge_period_s": {{{periods}}},')
    edges = [f'    "{edge}": [' + ", ".join(f"[{_num(s)!r}, {_num(e)!r}]" for s, e in spans) + "]"
             for edge, spans in sorted(trace.intervals.items())]
    lines += ['  "edges": {', ",\n".join(edges), "  }", "}"] if edges else ['  "edges": {}', "}"]
    write_text(path, "\n".join(line for line in lines if line) + "\n")


# --- devices ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DeviceRow:
    """One edge's device: what is not given falls back to the run's settings."""

    gflops: float | None = None      # effective training GFLOP/s
    sample_ms: float | None = None   # ms to train on one sample of the run's model (one epoch)
    up_mbps: float | None = None     # uplink, Mbit/s (10^6 bit/s)
    down_mbps: float | None = None   # downlink, Mbit/s
    rtt_ms: float | None = None      # round-trip time, ms (may be 0)

    def __post_init__(self) -> None:
        for name in DEVICE_COLUMNS:
            value = getattr(self, name)
            if value is not None and not _device_value_ok(name, value):
                raise ValueError(f"DeviceRow.{name} must be a finite number {_device_bound(name)}, got {value!r}")


def _device_value_ok(name: str, value: float) -> bool:
    return math.isfinite(value) and (value >= 0 if name == "rtt_ms" else value > 0)


def _device_bound(name: str) -> str:
    return ">= 0" if name == "rtt_ms" else "> 0"


def _device_row(where: str, values: dict[str, float | None]) -> DeviceRow:
    if all(v is None for v in values.values()):
        raise TraceError(f"{where}: gives no value; fill at least one of {', '.join(DEVICE_COLUMNS)} or drop it")
    for name, value in values.items():
        if value is not None and not _device_value_ok(name, value):
            raise TraceError(f"{where}: {name} must be {_device_bound(name)}, got {value!r}")
    return DeviceRow(**values)


def load_devices(path: str | Path) -> dict[int, DeviceRow]:
    """Read device rows: CSV (edge, then any of DEVICE_COLUMNS; blank = not given) or JSON ({"edges": {...}})."""
    text = _read_text(path)
    out: dict[int, DeviceRow] = {}
    if _is_json(path, text):
        data = _json_object(path, text, {"edges"}, required={"edges"})
        for key, value in _json_map(path, "edges", data["edges"]).items():
            where = f"{path}: edges[{key!r}]"
            given = _json_map(path, f"edges[{key!r}]", value)
            if unknown := sorted(set(given) - set(DEVICE_COLUMNS)):
                raise TraceError(f"{where}: unknown keys {unknown}; use {', '.join(DEVICE_COLUMNS)}")
            edge = _edge(f"{path}: edges", key)
            if edge in out:
                raise TraceError(f"{where}: edge {edge} again under another spelling; keep one entry per edge")
            out[edge] = _device_row(where, {c: None if v is None else json_number(f"{where}.{c}", v)
                                            for c, v in given.items()})
        return dict(sorted(out.items()))
    rows = _csv_rows(path, text)
    first = next(rows, None)
    header = first[1] if first else []
    columns = header[1:]
    if not header or header[0] != "edge" or not columns or set(columns) - set(DEVICE_COLUMNS) \
            or len(set(columns)) != len(columns):
        raise TraceError(f"{path}: the first line must be 'edge' then distinct columns from "
                         f"{', '.join(DEVICE_COLUMNS)}, got {','.join(header) or 'nothing'}")
    lines: dict[int, int] = {}
    for line, cells in rows:
        where = f"{path}: line {line}"
        if len(cells) != len(header):
            raise TraceError(f"{where}: expected {len(header)} cells ({','.join(header)}), got {len(cells)}")
        edge = _edge(where, cells[0])
        if edge in lines:
            raise TraceError(f"{where}: edge {edge} again (first on line {lines[edge]}); keep one row per edge")
        lines[edge] = line
        out[edge] = _device_row(where, {c: _number(where, c, v) if v.strip() else None
                                        for c, v in zip(columns, cells[1:], strict=True)})
    return dict(sorted(out.items()))


def write_devices_csv(path: str | Path, rows: dict[int, DeviceRow]) -> None:
    """Write device rows as CSV, sorted by edge, with the columns at least one row gives (in DEVICE_COLUMNS order)."""
    columns = [c for c in DEVICE_COLUMNS if any(getattr(r, c) is not None for r in rows.values())]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["edge", *columns])
    for edge, row in sorted(rows.items()):
        writer.writerow([edge, *("" if getattr(row, c) is None else repr(_num(getattr(row, c))) for c in columns)])
    write_text(path, buf.getvalue())


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror or exc}); check the path") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV or JSON") from exc


def write_text(path: str | Path, text: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _is_json(path: str | Path, text: str) -> bool:
    suffix = Path(path).suffix.lower()
    return suffix == ".json" or (suffix != ".csv" and text.lstrip().startswith("{"))


def _csv_rows(path: str | Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, cells) for each non-blank CSV row, cells stripped of surrounding spaces."""
    reader = csv.reader(io.StringIO(text))
    try:
        for cells in reader:
            if any(c.strip() for c in cells):
                yield reader.line_num, [c.strip() for c in cells]
    except csv.Error as exc:
        raise TraceError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from exc


def _json_object(path: str | Path, text: str, keys: set[str], required: set[str]) -> dict:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise TraceError(f"{path}: key {key!r} appears twice in one object; keep one")
            seen[key] = value
        return seen
    try:
        data = json.loads(text, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise TraceError(f"{path}: the top level must be a JSON object with {', '.join(sorted(keys))}")
    if unknown := sorted(set(data) - keys):
        raise TraceError(f"{path}: unknown keys {unknown}; the allowed keys are {sorted(keys)}")
    if missing := sorted(required - set(data)):
        raise TraceError(f"{path}: missing keys {missing}")
    return data


def _json_map(path: str | Path, name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise TraceError(f"{path}: {name} must be a JSON object, got {type(value).__name__}")
    return value


def _edge(where: str, cell: str) -> int:
    if not EDGE_PATTERN.fullmatch(cell):
        raise TraceError(f"{where}: edge {cell!r} is not a non-negative integer")
    return int(cell)


def _number(where: str, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise TraceError(f"{where}: {column} {cell!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}: {column} {cell!r} is not a finite number")
    return value


def json_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"{where}: {value!r} is not a number")
    if not math.isfinite(value):
        raise TraceError(f"{where}: {value!r} is not a finite number")
    return float(value)


def positive(where: str, value: Any) -> float:
    number = json_number(where, value)
    if number <= 0:
        raise TraceError(f"{where}: must be > 0, got {value!r}")
    return number


def _num(value: float | None) -> int | float | None:
    """A whole float as an int (600, not 600.0), so written files read naturally; exact below 2**53."""
    if value is not None and float(value).is_integer() and abs(value) < 2**53:
        return int(value)
    return value

