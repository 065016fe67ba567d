"""Availability and device traces for simulated edges: their CSV/JSON files, and an importer for FedScale's traces."""
from __future__ import annotations

import bisect
import csv
import io
import json
import math
import os
import pickle
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_PICKLE_BYTES = 512 * 1024 * 1024    # FedScale's largest trace is tens of MiB; a bigger file is not one of them
DEVICE_COLUMNS = ("gflops", "sample_ms", "up_mbps", "down_mbps", "rtt_ms")
AVAILABILITY_HEADER = ["edge", "start_s", "end_s"]
_EDGE = re.compile(r"[0-9]+")


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


def _merge(spans: list[Interval]) -> tuple[Interval, ...]:
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
    return AvailabilityTrace({edge: _merge(s) for edge, s in sorted(spans.items())})


def _availability_json(path: str | Path, text: str) -> AvailabilityTrace:
    data = _json_object(path, text, {"period_s", "edges", "edge_period_s"}, required={"edges"})
    period = None if data.get("period_s") is None else _positive(f"{path}: period_s", data["period_s"])
    edge_periods = {
        _edge(f"{path}: edge_period_s", key): _positive(f"{path}: edge_period_s[{key!r}]", value)
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
        intervals[edge] = _merge([_interval(where, _json_number(where, s), _json_number(where, e), own)
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
    _write_text(path, "\n".join(line for line in lines if line) + "\n")


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
            out[edge] = _device_row(where, {c: None if v is None else _json_number(f"{where}.{c}", v)
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
    _write_text(path, buf.getvalue())


# --- a pickle loader that builds only plain data ----------------------------------------------------------------

class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str | Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        raise TraceError(f"{self._path}: the pickle asks for {module}.{name}; "
                         "only plain dicts, lists, strings and numbers are loaded")

    def persistent_load(self, pid: Any) -> Any:
        raise TraceError(f"{self._path}: the pickle refers to an outside object (persistent id); "
                         "only plain dicts, lists, strings and numbers are loaded")


def restricted_load(path: str | Path) -> object:
    """Unpickle a file that holds only dicts, lists, tuples, str, bytes, numbers, bools and None.

    Every global (a class or function: os.system, numpy arrays, ...) goes through find_class, which refuses it,
    so nothing but those plain values is ever built or called."""
    try:
        size = os.path.getsize(path)
        if size > MAX_PICKLE_BYTES:
            raise TraceError(f"{path}: {size} bytes is over the {MAX_PICKLE_BYTES}-byte limit for a trace pickle")
        with open(path, "rb") as fin:
            return _PlainUnpickler(fin, path).load()
    except TraceError:
        raise
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror or exc}); check the path") from exc
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, RecursionError, MemoryError) as exc:
        raise TraceError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


# --- FedScale -----------------------------------------------------------------------------------------------------

def import_fedscale(device_file: str | None, behaviour_file: str | None, out_dir: Path, allow_pickle: bool,
                    limit: int | None = None) -> dict:
    """Convert FedScale's device and behaviour traces into devices.csv, availability.json and clients.csv.

    Followed, in SymbioticLab/FedScale: fedscale/cloud/internal/client_metadata.py (ClientMetadata.__init__,
    is_active, get_completion_time), fedscale/cloud/aggregation/aggregator.py (load_client_profile,
    client_register_handler, run: model_update_size) and fedscale/cloud/client_manager.py (register_client), and
    docs' "Device Trace File Formats". Both files are pickled dicts keyed by client id:

    - device file, {id: {"computation": ms per sample, forward pass, "communication": kbps}}. FedScale charges
      3.0 * batch_size * local_steps * computation / 1000 s of compute (the backward pass taken as twice the
      forward) and model_size_kbits / communication s per transfer, the same up and down. So here
      sample_ms = 3 * computation and up_mbps = down_mbps = communication / 1000. (FedScale's model "kbits" are
      bytes / 1024 * 8, so its transfers come out 2.3% shorter than bytes * 8 / (up_mbps * 10^6).)
    - behaviour file, {id: {"finish_time", "active": [...], "inactive": [...], "duration", ...}}. is_active(t)
      answers active[i] <= t % finish_time <= inactive[i] (both ends inclusive). Here each pair becomes the online
      interval [active[i], nextafter(inactive[i])) clipped to [0, finish_time), so online() agrees with that test
      at every float time, and the edge's period is finish_time (period_s when all clients share it, else the
      most common one, with edge_period_s for the others). Unpaired trailing entries are ignored, as FedScale never
      reads them. FedScale's is_active keeps a cursor (behavior_index) that moves at most one interval per call
      and answers from that interval alone: it matches this for calls in time order that skip no interval, but
      when the last interval runs to finish_time the cursor never returns to the first one, so after the first
      wrap FedScale calls such a client inactive in its first interval. What is reproduced is the test is_active
      means, not the cursor.

    Client ids become edges 0..n-1 in ascending id order (numerically when the ids are all ints or all digit
    strings, else by their text), over the union of both files' ids; limit keeps the first n. FedScale itself pairs
    its k-th registered client with device key k % len and the (k % len)-th behaviour key in file order, which
    depends on its executors and is not reproduced. Only the files given are written, plus clients.csv
    (edge,fedscale_client_id). Pickles are read with restricted_load; nothing is written unless both files load
    and check out."""
    named = device_file or behaviour_file
    if named is None:
        raise TraceError("import-fedscale needs a FedScale device file, behaviour file or both (--device, --behaviour)")
    if not allow_pickle:
        raise TraceError(f"{named}: FedScale's traces are pickles: pass --allow-pickle to load them with the "
                         "restricted unpickler")
    if limit is not None and limit < 1:
        raise TraceError(f"limit must be at least 1, got {limit}")
    devices = _fedscale_devices(device_file) if device_file else {}
    behaviour = _fedscale_behaviour(behaviour_file) if behaviour_file else {}
    ids = sorted(set(devices) | set(behaviour), key=_id_order_key(set(devices) | set(behaviour)))
    if limit is not None:
        ids = ids[:limit]
    out_dir = Path(out_dir)
    try:
        written = _write_fedscale(out_dir, ids, devices if device_file else None,
                                  behaviour if behaviour_file else None)
    except OSError as exc:
        raise TraceError(f"{out_dir}: cannot write the converted traces ({exc.strerror or exc}); check --out") from exc
    chosen = set(ids)
    return {"clients": len(ids), "devices": len(chosen & set(devices)), "availability": len(chosen & set(behaviour)),
            "device_file_clients": len(devices), "behaviour_file_clients": len(behaviour),
            "dropped_by_limit": len(set(devices) | set(behaviour)) - len(ids), "written": written}


def _write_fedscale(out_dir: Path, ids: list, devices: dict[Any, DeviceRow] | None,
                    behaviour: dict[Any, tuple[float, tuple[Interval, ...]]] | None) -> list[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if devices is not None:
        rows = {edge: devices[cid] for edge, cid in enumerate(ids) if cid in devices}
        write_devices_csv(out_dir / "devices.csv", rows)
        written.append(str(out_dir / "devices.csv"))
    if behaviour is not None:
        trace = _fedscale_trace({edge: behaviour[cid] for edge, cid in enumerate(ids) if cid in behaviour})
        write_availability_json(out_dir / "availability.json", trace)
        written.append(str(out_dir / "availability.json"))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["edge", "fedscale_client_id"])
    writer.writerows(enumerate(ids))
    _write_text(out_dir / "clients.csv", buf.getvalue())
    written.append(str(out_dir / "clients.csv"))
    return written


def _fedscale_dict(path: str) -> dict:
    data = restricted_load(path)
    if not isinstance(data, dict) or not data:
        raise TraceError(f"{path}: expected a non-empty dict of client id -> entry, got {type(data).__name__}")
    for cid in data:
        if not isinstance(cid, (int, str)) or isinstance(cid, bool):
            raise TraceError(f"{path}: client id {cid!r} is a {type(cid).__name__}; expected an int or a string")
    return data


def _fedscale_devices(path: str) -> dict[Any, DeviceRow]:
    out = {}
    for cid, entry in _fedscale_dict(path).items():
        where = f"{path}: client {cid!r}"
        if not isinstance(entry, dict) or "computation" not in entry or "communication" not in entry:
            raise TraceError(f"{where}: expected a dict with 'computation' and 'communication'")
        computation = _json_number(f"{where}: computation", entry["computation"])
        communication = _json_number(f"{where}: communication", entry["communication"])
        if not (computation > 0 and communication > 0 and math.isfinite(computation * communication)):
            raise TraceError(f"{where}: computation and communication must be finite and > 0, "
                             f"got {computation!r} and {communication!r}")
        up = communication / 1000
        out[cid] = DeviceRow(sample_ms=3 * computation, up_mbps=up, down_mbps=up)
    return out


def _fedscale_behaviour(path: str) -> dict[Any, tuple[float, tuple[Interval, ...]]]:
    out = {}
    for cid, entry in _fedscale_dict(path).items():
        where = f"{path}: client {cid!r}"
        if not isinstance(entry, dict) or not {"finish_time", "active", "inactive"} <= set(entry):
            raise TraceError(f"{where}: expected a dict with 'finish_time', 'active' and 'inactive'")
        period = _positive(f"{where}: finish_time", entry["finish_time"])
        active, inactive = entry["active"], entry["inactive"]
        if not isinstance(active, (list, tuple)) or not isinstance(inactive, (list, tuple)) or not active \
                or len(inactive) < len(active):
            raise TraceError(f"{where}: 'active' must be a non-empty list and 'inactive' at least as long "
                             "(FedScale's is_active fails otherwise)")
        spans = []
        for on, off in zip(active, inactive, strict=False):   # FedScale never reads unpaired inactive[i]
            start = max(_json_number(f"{where}: active", on), 0.0)
            end = min(math.nextafter(_json_number(f"{where}: inactive", off), math.inf), period)
            if start < end:
                spans.append((start, end))
        out[cid] = (period, _merge(spans))
    return out


def _fedscale_trace(entries: dict[int, tuple[float, tuple[Interval, ...]]]) -> AvailabilityTrace:
    periods = Counter(period for period, _ in entries.values())
    common = min(periods, key=lambda p: (-periods[p], p)) if periods else None
    return AvailabilityTrace({edge: spans for edge, (_, spans) in entries.items()}, common,
                             {edge: p for edge, (p, _) in entries.items() if p != common})


def _id_order_key(ids: set) -> Any:
    if all(isinstance(i, int) for i in ids):
        return lambda i: (i, "")
    if all(isinstance(i, str) and _EDGE.fullmatch(i) for i in ids):
        return lambda i: (int(i), i)
    return lambda i: (str(i), type(i).__name__)


# --- shared file helpers ------------------------------------------------------------------------------------------

def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise TraceError(f"{path}: cannot read it ({exc.strerror or exc}); check the path") from exc
    except UnicodeDecodeError as exc:
        raise TraceError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 CSV or JSON") from exc


def _write_text(path: str | Path, text: str) -> None:
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
    if not _EDGE.fullmatch(cell):
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


def _json_number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TraceError(f"{where}: {value!r} is not a number")
    if not math.isfinite(value):
        raise TraceError(f"{where}: {value!r} is not a finite number")
    return float(value)


def _positive(where: str, value: Any) -> float:
    number = _json_number(where, value)
    if number <= 0:
        raise TraceError(f"{where}: must be > 0, got {value!r}")
    return number


def _num(value: float | None) -> int | float | None:
    """A whole float as an int (600, not 600.0), so written files read naturally; exact below 2**53."""
    if value is not None and float(value).is_integer() and abs(value) < 2**53:
        return int(value)
    return value

