"""FedScale's device-capacity and behaviour traces (pickles) read with an unpickler that builds only plain data, and
converted into fledger's trace files (node.engine.traces)."""
from __future__ import annotations

import csv
import io
import math
import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

from node.engine.traces import (
    EDGE_PATTERN,
    AvailabilityTrace,
    DeviceRow,
    Interval,
    TraceError,
    json_number,
    merge_intervals,
    positive,
    write_availability_json,
    write_devices_csv,
    write_text,
)

MAX_PICKLE_BYTES = 512 * 1024 * 1024    # FedScale's largest trace is tens of MiB; a bigger file is not one of them


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
    write_text(out_dir / "clients.csv", buf.getvalue())
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
        computation = json_number(f"{where}: computation", entry["computation"])
        communication = json_number(f"{where}: communication", entry["communication"])
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
        period = positive(f"{where}: finish_time", entry["finish_time"])
        active, inactive = entry["active"], entry["inactive"]
        if not isinstance(active, (list, tuple)) or not isinstance(inactive, (list, tuple)) or not active \
                or len(inactive) < len(active):
            raise TraceError(f"{where}: 'active' must be a non-empty list and 'inactive' at least as long "
                             "(FedScale's is_active fails otherwise)")
        spans = []
        for on, off in zip(active, inactive, strict=False):   # FedScale never reads unpaired inactive[i]
            start = max(json_number(f"{where}: active", on), 0.0)
            end = min(math.nextafter(json_number(f"{where}: inactive", off), math.inf), period)
            if start < end:
                spans.append((start, end))
        out[cid] = (period, merge_intervals(spans))
    return out


def _fedscale_trace(entries: dict[int, tuple[float, tuple[Interval, ...]]]) -> AvailabilityTrace:
    periods = Counter(period for period, _ in entries.values())
    common = min(periods, key=lambda p: (-periods[p], p)) if periods else None
    return AvailabilityTrace({edge: spans for edge, (_, spans) in entries.items()}, common,
                             {edge: p for edge, (p, _) in entries.items() if p != common})


def _id_order_key(ids: set) -> Any:
    if all(isinstance(i, int) for i in ids):
        return lambda i: (i, "")
    if all(isinstance(i, str) and EDGE_PATTERN.fullmatch(i) for i in ids):
        return lambda i: (int(i), i)
    return lambda i: (str(i), type(i).__name__)


# --- shared file helpers ------------------------------------------------------------------------------------------

