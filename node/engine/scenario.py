"""A scenario file (TOML): the edge network's shape and conditions, written once and run in the simulator and on
the real network alike: device, link, availability and attack of every edge node, the backbone between super
nodes, and the round's deadline and over-commitment. README "Scenarios" documents every key."""
from __future__ import annotations

import bisect
import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from config import ConfigError
from node.engine.profiles import DeviceProfile, LinkProfile, number, parse_device, parse_link, with_trace

SECTIONS = {"network", "defaults", "edges", "links", "round", "compute", "traces"}
EDGE_KEYS = {"device", "link", "availability", "attack"}
MAX_EDGES = 100_000


@dataclass(frozen=True)
class Availability:
    """When an edge node is online: always, an alternating on/off process with exponential durations (seeded
    per edge), or a trace (node.engine.traces)."""

    kind: str                         # "always" | "markov" | "trace"
    mean_on_s: float = 0.0
    mean_off_s: float = 0.0
    trace: str | None = None          # path of an availability trace (kind "trace")


@dataclass(frozen=True)
class EdgeSetup:
    """One edge node's conditions."""

    device: DeviceProfile
    link: LinkProfile
    availability: Availability
    attack: str | None = None


@dataclass(frozen=True)
class Scenario:
    super_nodes: int
    edge_nodes: int
    edges: tuple[EdgeSetup, ...]      # by edge index (data share)
    backbone: LinkProfile             # super node to super node
    deadline_s: float | None
    overcommit: float
    host_gflops: float | None         # this machine's measured training rate, when pinned ([compute])
    digest: str                       # what identifies the scenario in the ledger (sha256 of its settings)
    source: str = ""
    # Drawn on/off windows by (seed, edge), and loaded availability traces by path: filled as the clock asks.
    _windows: dict[tuple[int, int], list[tuple[float, float]]] = field(default_factory=dict, compare=False,
                                                                       repr=False)
    _traces: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def needs_host_rate(self) -> bool:
        return any(e.device.relative is not None for e in self.edges)

    def with_host_gflops(self, gflops: float) -> Scenario:
        return replace(self, host_gflops=gflops)

    def offline_at(self, edge: int, seed: int, t0: float, t1: float) -> float | None:
        """The first simulated time in [t0, t1) at which edge ``edge`` is offline, None when online throughout."""
        setup = self.edges[edge]
        kind = setup.availability.kind
        if kind == "always":
            return None
        if kind == "trace":
            from node.engine.traces import load_availability
            path = setup.availability.trace or ""
            if path not in self._traces:
                self._traces[path] = load_availability(path)
            trace = self._traces[path]
            if not trace.has(edge):
                raise ConfigError(f"availability trace {setup.availability.trace} has no rows for edge {edge}")
            return trace.offline_at(edge, t0, t1)
        windows = self._online_windows(edge, seed, t1)   # sorted, disjoint online windows; offline between them
        i = bisect.bisect_right(windows, t0, key=lambda w: w[1])   # the first window ending after t0
        if i == len(windows) or windows[i][0] > t0:
            return t0
        end = windows[i][1]
        return end if end < t1 else None

    def _online_windows(self, edge: int, seed: int, until: float) -> list[tuple[float, float]]:
        """The seeded on/off process of ``edge`` up to ``until``: on for Exp(mean_on), off for Exp(mean_off),
        starting on with probability mean_on / (mean_on + mean_off)."""
        a = self.edges[edge].availability
        windows = self._windows.setdefault((seed, edge), [])
        rng_key = f"{seed}/avail/{edge}"
        if not windows:
            rng = random.Random(int.from_bytes(hashlib.sha256(rng_key.encode()).digest()[:8], "big"))
            t = 0.0 if rng.random() < a.mean_on_s / (a.mean_on_s + a.mean_off_s) else rng.expovariate(1 / a.mean_off_s)
            windows.append((t, t + rng.expovariate(1 / a.mean_on_s)))
        while windows[-1][1] <= until:
            # Each further window draws from its own seeded stream, so extending the horizon never changes the past.
            index = len(windows)
            rng = random.Random(int.from_bytes(hashlib.sha256(f"{rng_key}/{index}".encode()).digest()[:8], "big"))
            start = windows[-1][1] + rng.expovariate(1 / a.mean_off_s)
            windows.append((start, start + rng.expovariate(1 / a.mean_on_s)))
        return windows


def parse_indices(text: Any, count: int, where: str) -> list[int]:
    """"0-4,7,10-12" (inclusive ranges) -> indices, each below ``count``."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"{where}: select must be indices like \"0-4,7\", got {text!r}")
    out: list[int] = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ConfigError(f"{where}: select {text!r}: {part.strip()!r} is not an index or a range a-b") from None
        if first < 0 or last < first or last >= count:
            raise ConfigError(f"{where}: select {text!r}: {part.strip()!r} is outside 0..{count - 1}")
        out.extend(range(first, last + 1))
    return out


def _availability(value: Any, where: str, base: Path) -> Availability:
    if value == "always":
        return Availability("always")
    if isinstance(value, Mapping) and set(value) == {"mean_on_s", "mean_off_s"}:
        return Availability("markov", number(where, "availability mean_on_s", value["mean_on_s"], 0.0),
                            number(where, "availability mean_off_s", value["mean_off_s"], 0.0))
    if isinstance(value, Mapping) and set(value) == {"trace"} and isinstance(value["trace"], str):
        path = (base / value["trace"]).resolve()
        if not path.is_file():
            raise ConfigError(f"{where}: availability trace {path} does not exist")
        return Availability("trace", trace=str(path))
    raise ConfigError(f"{where}: availability is \"always\", {{ mean_on_s = 600, mean_off_s = 300 }} or "
                      f"{{ trace = \"avail.csv\" }}, got {value!r}")


def _edge_fields(table: Mapping[str, Any], where: str, base: Path, current: EdgeSetup) -> EdgeSetup:
    unknown = sorted(set(table) - EDGE_KEYS - {"select"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(EDGE_KEYS))}")
    setup = current
    if "device" in table:
        setup = replace(setup, device=parse_device(table["device"], where))
    if "link" in table:
        setup = replace(setup, link=parse_link(table["link"], where))
    if "availability" in table:
        setup = replace(setup, availability=_availability(table["availability"], where, base))
    if "attack" in table:
        from fl.attacks import parse_attack
        spec = table["attack"]
        try:
            parse_attack(spec)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{where}: attack: {exc}") from None
        setup = replace(setup, attack=spec)
    return setup


def _count(section: Mapping[str, Any], key: str, where: str, default: int) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _optional(section: Mapping[str, Any], key: str, where: str) -> float | None:
    """A number > 0 when given."""
    return None if key not in section else number(where, key, section[key], 0.0)


def load_scenario(path: str | Path) -> Scenario:
    """Read and check a scenario file; ConfigError naming the file, the table and the key on any problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read scenario {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"scenario {path} is not valid TOML: {exc}") from None
    return scenario_from(data, path)


def scenario_from(data: Mapping[str, Any], path: Path) -> Scenario:
    name = str(path)
    unknown = sorted(set(data) - SECTIONS)
    if unknown:
        raise ConfigError(f"scenario {name}: unknown table [{unknown[0]}]; known: {', '.join(sorted(SECTIONS))}")
    base = path.parent
    network = _table(data, "network", name)
    _only(network, {"super_nodes", "edge_nodes"}, f"scenario {name} [network]")
    sns = _count(network, "super_nodes", f"scenario {name} [network]", 1)
    count = _count(network, "edge_nodes", f"scenario {name} [network]", 4)
    if count > MAX_EDGES:
        raise ConfigError(f"scenario {name} [network]: edge_nodes must be at most {MAX_EDGES}, got {count}")
    defaults = _table(data, "defaults", name)
    setup = _edge_fields(defaults, f"scenario {name} [defaults]", base,
                         EdgeSetup(parse_device("laptop", ""), parse_link("lan", ""), Availability("always")))
    if "select" in defaults:
        raise ConfigError(f"scenario {name} [defaults]: select belongs in [[edges]] entries")
    edges = [setup] * count
    entries = data.get("edges", [])
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError(f"scenario {name}: edges must be [[edges]] tables")
    for i, entry in enumerate(entries):
        where = f"scenario {name} [[edges]] #{i + 1}"
        if "select" not in entry:
            raise ConfigError(f"{where}: needs select = \"0-4\" (the edge node indices it applies to)")
        for index in parse_indices(entry["select"], count, where):
            edges[index] = _edge_fields(entry, where, base, edges[index])
    links = _table(data, "links", name)
    _only(links, {"backbone"}, f"scenario {name} [links]")
    backbone = parse_link(links.get("backbone", "lan"), f"scenario {name} [links] backbone")
    rnd = _table(data, "round", name)
    _only(rnd, {"deadline_s", "overcommit"}, f"scenario {name} [round]")
    deadline = _optional(rnd, "deadline_s", f"scenario {name} [round]")
    overcommit = number(f"scenario {name} [round]", "overcommit", rnd.get("overcommit", 1.0), 1.0, strict=False)
    compute = _table(data, "compute", name)
    _only(compute, {"host_gflops"}, f"scenario {name} [compute]")
    host = _optional(compute, "host_gflops", f"scenario {name} [compute]")
    traces = _table(data, "traces", name)
    _only(traces, {"devices"}, f"scenario {name} [traces]")
    if "devices" in traces:
        edges = _apply_device_trace(edges, (base / str(traces["devices"])).resolve(), name)
    digest = hashlib.sha256(json.dumps(_canonical(data, base), sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()
    return Scenario(sns, count, tuple(edges), backbone, deadline, overcommit, host, digest, name)


def _canonical(data: Mapping[str, Any], base: Path) -> Any:
    """The scenario's settings with every trace file's content hash in place of its path, minus the pinned host
    rate (recorded on its own), so the same conditions give the same digest wherever the files lie."""
    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, k) for k, v in value.items() if k != "compute"}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if key in ("trace", "devices") and isinstance(value, str):
            target = (base / value).resolve()
            return "sha256:" + (hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else "missing")
        return value
    return walk(data)


def _apply_device_trace(edges: list[EdgeSetup], path: Path, name: str) -> list[EdgeSetup]:
    from node.engine.traces import TraceError, load_devices
    try:
        rows = load_devices(str(path))
    except TraceError as exc:
        raise ConfigError(f"scenario {name} [traces] devices: {exc}") from None
    out = list(edges)
    for index, row in rows.items():
        if index >= len(out):
            raise ConfigError(f"scenario {name} [traces] devices: {path} names edge {index}, but the network has "
                              f"{len(out)} edge nodes")
        setup = out[index]
        device = setup.device
        if row.sample_ms is not None:
            device = DeviceProfile(f"trace:{row.sample_ms:g}ms", sample_ms=row.sample_ms)
        elif row.gflops is not None:
            device = DeviceProfile(f"trace:{row.gflops:g}GFLOP/s", gflops=row.gflops)
        out[index] = replace(setup, device=device,
                             link=with_trace(setup.link, row.up_mbps, row.down_mbps, row.rtt_ms))
    return out


def _table(data: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"scenario {name}: [{key}] must be a table")
    return value


def _only(table: Mapping[str, Any], keys: set[str], where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(keys))}")
