"""Availability and device trace files, the restricted unpickler, and the FedScale importer and its command."""
from __future__ import annotations

import argparse
import math
import os
import pickle
import pickletools
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from node.cli.traces import cmd_traces, register
from node.engine.fedscale import MAX_PICKLE_BYTES, import_fedscale, restricted_load
from node.engine.traces import (
    AvailabilityTrace,
    DeviceRow,
    TraceError,
    load_availability,
    load_devices,
    write_availability_json,
    write_devices_csv,
)

# Three FedScale clients with ids out of order; 3 is online across the wrap, 7 has a shorter finish_time.
FEDSCALE_DEVICES = {7: {"computation": 12.5, "communication": 4000.0}, 12: {"computation": 40.0, "communication": 1500},
                    3: {"computation": 2.25, "communication": 20000.0}}
FEDSCALE_BEHAVIOUR = {
    12: {"duration": 1000, "finish_time": 1000, "active": [100, 600], "inactive": [300, 900], "model": "x"},
    3: {"duration": 1000, "finish_time": 1000, "active": [0, 500], "inactive": [200, 1000]},
    7: {"duration": 500, "finish_time": 500, "active": [50], "inactive": [450]},
}
EDGE_OF = {3: 0, 7: 1, 12: 2}
ROOT = Path(__file__).resolve().parent.parent


def fedscale_is_active(trace: dict, cur_time: float) -> bool:
    """FedScale's ClientMetadata.is_active test without its cursor: active[i] <= t % finish <= inactive[i]."""
    norm_time = cur_time % trace["finish_time"]
    return any(a <= norm_time <= b for a, b in zip(trace["active"], trace["inactive"], strict=False))


class FedScaleCursor:
    """FedScale's is_active as written (fedscale/cloud/internal/client_metadata.py), cursor and all."""

    def __init__(self, traces: dict) -> None:
        self.traces = traces
        self.behavior_index = 0

    def is_active(self, cur_time: float) -> bool:
        norm_time = cur_time % self.traces["finish_time"]
        if norm_time > self.traces["inactive"][self.behavior_index]:
            self.behavior_index += 1
        self.behavior_index %= len(self.traces["active"])
        return self.traces["active"][self.behavior_index] <= norm_time <= self.traces["inactive"][self.behavior_index]


def dump(path: Path, obj: object) -> str:
    with open(path, "wb") as fout:
        pickle.dump(obj, fout)
    return str(path)


@pytest.fixture()
def fedscale_files(tmp_path: Path) -> tuple[str, str]:
    return dump(tmp_path / "device.pkl", FEDSCALE_DEVICES), dump(tmp_path / "behaviour.pkl", FEDSCALE_BEHAVIOUR)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- FedScale import: known values ---------------------------------------------------------------------------------

def test_fedscale_import_writes_known_devices_clients_and_availability(tmp_path, fedscale_files) -> None:
    summary = import_fedscale(*fedscale_files, tmp_path / "out", allow_pickle=True)

    assert (tmp_path / "out" / "devices.csv").read_text() == (
        "edge,sample_ms,up_mbps,down_mbps\n0,6.75,20,20\n1,37.5,4,4\n2,120,1.5,1.5\n")
    assert (tmp_path / "out" / "clients.csv").read_text() == "edge,fedscale_client_id\n0,3\n1,7\n2,12\n"
    # Ends are the float just above FedScale's inactive time, which its is_active still counts as active.
    assert (tmp_path / "out" / "availability.json").read_text() == (
        '{\n  "period_s": 1000,\n  "edge_period_s": {"1": 500},\n  "edges": {\n'
        '    "0": [[0, 200.00000000000003], [500, 1000]],\n'
        '    "1": [[50, 450.00000000000006]],\n'
        '    "2": [[100, 300.00000000000006], [600, 900.0000000000001]]\n  }\n}\n')
    assert summary["clients"] == 3 and summary["devices"] == 3 and summary["availability"] == 3
    assert summary["dropped_by_limit"] == 0 and len(summary["written"]) == 3


def test_fedscale_device_rows_reproduce_fedscale_completion_time(tmp_path, fedscale_files) -> None:
    import_fedscale(fedscale_files[0], None, tmp_path / "out", allow_pickle=True)
    rows = load_devices(tmp_path / "out" / "devices.csv")
    batch_size, local_steps, model_kbits = 20, 5, 8000.0
    for cid, speed in FEDSCALE_DEVICES.items():
        row = rows[EDGE_OF[cid]]
        fedscale_compute = 3.0 * batch_size * local_steps * float(speed["computation"]) / 1000.0
        assert row.sample_ms is not None and row.up_mbps is not None and row.down_mbps is not None
        assert row.sample_ms * batch_size * local_steps / 1000.0 == pytest.approx(fedscale_compute, rel=1e-12)
        fedscale_transfer = model_kbits / float(speed["communication"])
        assert model_kbits * 1000 / (row.up_mbps * 1e6) == pytest.approx(fedscale_transfer, rel=1e-12)
        assert row.up_mbps == row.down_mbps


TIMES = [0, 0.5, 49.9, 50, 99.999, 100, 150, 200, 200.0000001, 299.5, 300, 300.0000001, 449, 450, 450.25, 499.99,
         500, 599, 600, 899, 900, 900.0001, 999.999, 1000, 1050, 1100, 1200, 1200.5, 1300, 1450, 1700, 2150.25,
         2300, 2300.0001, 2999.75, 3000, 12345.6, 86399.5]


@pytest.mark.parametrize("cid", sorted(FEDSCALE_BEHAVIOUR))
def test_fedscale_availability_agrees_with_is_active_including_after_the_wrap(tmp_path, fedscale_files, cid) -> None:
    import_fedscale(None, fedscale_files[1], tmp_path / "out", allow_pickle=True)
    trace = load_availability(tmp_path / "out" / "availability.json")
    for t in TIMES:
        assert trace.online(EDGE_OF[cid], t) == fedscale_is_active(FEDSCALE_BEHAVIOUR[cid], t), t


@pytest.mark.parametrize("cid", sorted(FEDSCALE_BEHAVIOUR))
def test_fedscale_availability_agrees_with_the_cursor_in_time_order_in_the_first_period(
        tmp_path, fedscale_files, cid) -> None:
    import_fedscale(None, fedscale_files[1], tmp_path / "out", allow_pickle=True)
    trace = load_availability(tmp_path / "out" / "availability.json")
    cursor = FedScaleCursor(FEDSCALE_BEHAVIOUR[cid])
    for t in np.arange(0, FEDSCALE_BEHAVIOUR[cid]["finish_time"], 0.5):
        assert trace.online(EDGE_OF[cid], float(t)) == cursor.is_active(float(t)), t


def test_fedscale_offline_at_finds_the_first_inactive_time(tmp_path, fedscale_files) -> None:
    import_fedscale(None, fedscale_files[1], tmp_path / "out", allow_pickle=True)
    trace = load_availability(tmp_path / "out" / "availability.json")
    cases = [(12, 150, 1000, math.nextafter(300.0, math.inf)), (12, 50, 60, 50), (12, 650, 800, None),
             (12, 2150, 5000, math.nextafter(2300.0, math.inf)),   # after two wraps
             (3, 700, 5000, math.nextafter(1200.0, math.inf)),     # online across the wrap, off after 200 s more
             (7, 60, 400, None), (7, 460, 470, 460), (7, 1040, 2000, 1040),
             (7, 1060, 2000, math.nextafter(1450.0, math.inf))]
    for cid, t0, t1, expected in cases:
        found = trace.offline_at(EDGE_OF[cid], t0, t1)
        assert found == expected, (cid, t0, t1)
        if found is not None:
            assert not fedscale_is_active(FEDSCALE_BEHAVIOUR[cid], found)
            before = np.linspace(t0, found, 200, endpoint=False) if found > t0 else []
            assert all(fedscale_is_active(FEDSCALE_BEHAVIOUR[cid], float(t)) for t in before)


def test_fedscale_limit_keeps_the_first_clients_by_id(tmp_path, fedscale_files) -> None:
    summary = import_fedscale(*fedscale_files, tmp_path / "out", allow_pickle=True, limit=2)
    assert (tmp_path / "out" / "clients.csv").read_text() == "edge,fedscale_client_id\n0,3\n1,7\n"
    assert sorted(load_devices(tmp_path / "out" / "devices.csv")) == [0, 1]
    assert summary["clients"] == 2 and summary["dropped_by_limit"] == 1


def test_fedscale_string_ids_of_digits_are_ordered_numerically(tmp_path) -> None:
    device = dump(tmp_path / "d.pkl", {"10": {"computation": 1, "communication": 1000}, "9": {"computation": 2,
                                                                                              "communication": 1000}})
    import_fedscale(device, None, tmp_path / "out", allow_pickle=True)
    assert (tmp_path / "out" / "clients.csv").read_text() == "edge,fedscale_client_id\n0,9\n1,10\n"


# --- pickles: only plain data ----------------------------------------------------------------------------------------

class RunsAShellCommand:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickle_calling_os_system_is_refused_and_runs_nothing(tmp_path) -> None:
    target = tmp_path / "SOMEFILE"
    path = dump(tmp_path / "evil.pkl", {1: RunsAShellCommand(target)})
    opcodes = {op.name for op, _, _ in pickletools.genops(Path(path).read_bytes())}
    assert opcodes & {"GLOBAL", "STACK_GLOBAL"} and "REDUCE" in opcodes   # the payload really asks for os.system

    with pytest.raises(TraceError, match=r"evil\.pkl: the pickle asks for (os|posix)\.system; only plain"):
        restricted_load(path)
    assert not target.exists()


def test_protocol_0_global_opcode_is_refused(tmp_path) -> None:
    target = tmp_path / "SOMEFILE"
    path = tmp_path / "evil0.pkl"
    path.write_bytes(b"cos\nsystem\n(S'touch " + str(target).encode() + b"'\ntR.")
    with pytest.raises(TraceError, match="asks for os.system"):
        restricted_load(path)
    assert not target.exists()


def test_persistent_id_in_a_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "persid.pkl"
    path.write_bytes(b"P1\n.")
    with pytest.raises(TraceError, match="persistent id"):
        restricted_load(path)


def test_numpy_arrays_and_scalars_in_a_pickle_are_refused(tmp_path) -> None:
    with pytest.raises(TraceError, match="asks for numpy"):
        restricted_load(dump(tmp_path / "array.pkl", {1: np.arange(3)}))
    with pytest.raises(TraceError, match="asks for numpy"):
        restricted_load(dump(tmp_path / "scalar.pkl", {1: {"computation": np.float64(2.0), "communication": 1.0}}))


def test_plain_data_round_trips_through_the_restricted_unpickler(tmp_path) -> None:
    data: dict = {1: [1.5, "a", (None, True), 2**70], "k": {"x": -3}}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        if protocol >= 3:
            data["bytes"] = b"b"   # protocols 0-2 pickle bytes as a call to _codecs.encode, which is refused
        with open(tmp_path / "plain.pkl", "wb") as fout:
            pickle.dump(data, fout, protocol=protocol)
        assert restricted_load(tmp_path / "plain.pkl") == data


def test_truncated_pickle_is_a_trace_error(tmp_path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({1: list(range(100))})[:20])
    with pytest.raises(TraceError, match=r"cut\.pkl: not a readable pickle"):
        restricted_load(path)


def test_pickle_over_the_size_limit_is_refused_unread(tmp_path) -> None:
    path = tmp_path / "huge.pkl"
    with open(path, "wb") as fout:
        fout.truncate(MAX_PICKLE_BYTES + 1)   # sparse: no disk used
    with pytest.raises(TraceError, match="over the .*-byte limit"):
        restricted_load(path)


def test_missing_pickle_is_a_trace_error(tmp_path) -> None:
    with pytest.raises(TraceError, match=r"nothere\.pkl: cannot read it"):
        restricted_load(tmp_path / "nothere.pkl")


def test_import_of_a_malicious_device_pickle_writes_nothing(tmp_path, fedscale_files) -> None:
    target = tmp_path / "SOMEFILE"
    evil = dump(tmp_path / "evil.pkl", {1: RunsAShellCommand(target)})
    with pytest.raises(TraceError, match="asks for"):
        import_fedscale(evil, fedscale_files[1], tmp_path / "out", allow_pickle=True)
    assert not target.exists() and not (tmp_path / "out").exists()


def test_import_without_allow_pickle_is_refused_and_writes_nothing(tmp_path, fedscale_files) -> None:
    with pytest.raises(TraceError, match="pass --allow-pickle"):
        import_fedscale(*fedscale_files, tmp_path / "out", allow_pickle=False)
    assert not (tmp_path / "out").exists()


# --- FedScale import: refused inputs ---------------------------------------------------------------------------------

def test_import_needs_a_device_or_behaviour_file(tmp_path) -> None:
    with pytest.raises(TraceError, match="--device, --behaviour"):
        import_fedscale(None, None, tmp_path / "out", allow_pickle=True)


def test_import_limit_below_one_is_refused(tmp_path, fedscale_files) -> None:
    with pytest.raises(TraceError, match="limit must be at least 1"):
        import_fedscale(*fedscale_files, tmp_path / "out", allow_pickle=True, limit=0)


def test_import_of_a_device_pickle_that_is_not_a_dict_is_refused(tmp_path) -> None:
    with pytest.raises(TraceError, match="expected a non-empty dict"):
        import_fedscale(dump(tmp_path / "d.pkl", [1, 2]), None, tmp_path / "out", allow_pickle=True)


def test_import_of_a_device_entry_without_communication_is_refused(tmp_path) -> None:
    with pytest.raises(TraceError, match=r"client 5: expected a dict with 'computation' and 'communication'"):
        import_fedscale(dump(tmp_path / "d.pkl", {5: {"computation": 1.0}}), None, tmp_path / "out", True)


def test_import_of_zero_bandwidth_is_refused(tmp_path) -> None:
    with pytest.raises(TraceError, match="client 5: computation and communication must be finite and > 0"):
        import_fedscale(dump(tmp_path / "d.pkl", {5: {"computation": 1.0, "communication": 0}}), None,
                        tmp_path / "out", True)


def test_import_of_behaviour_with_fewer_inactive_than_active_times_is_refused(tmp_path) -> None:
    bad = {5: {"finish_time": 100, "active": [0, 50], "inactive": [10]}}
    with pytest.raises(TraceError, match="'inactive' at least as long"):
        import_fedscale(None, dump(tmp_path / "b.pkl", bad), tmp_path / "out", True)


def test_import_of_behaviour_with_zero_finish_time_is_refused(tmp_path) -> None:
    bad = {5: {"finish_time": 0, "active": [0], "inactive": [10]}}
    with pytest.raises(TraceError, match="finish_time: must be > 0"):
        import_fedscale(None, dump(tmp_path / "b.pkl", bad), tmp_path / "out", True)


# --- availability traces -----------------------------------------------------------------------------------------

def test_availability_csv_merges_overlapping_and_touching_rows_in_any_order(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start_s,end_s\n3,50,60\n0,10,20\n0,0,10\n0,15,30\n3,0,5\n\n0,40,41\n")
    trace = load_availability(path)
    assert trace == AvailabilityTrace({0: ((0.0, 30.0), (40.0, 41.0)), 3: ((0.0, 5.0), (50.0, 60.0))}, None)


def test_availability_json_round_trips(tmp_path) -> None:
    trace = AvailabilityTrace({0: ((0.0, 600.0), (900.5, 1500.0)), 3: (), 11: ((0.0, 86400.0),)}, 86400.0,
                              {3: 60.0})
    write_availability_json(tmp_path / "a.json", trace)
    assert load_availability(tmp_path / "a.json") == trace


def test_availability_json_without_period_round_trips(tmp_path) -> None:
    trace = AvailabilityTrace({2: ((1.25, 2.5),)}, None)
    write_availability_json(tmp_path / "a.json", trace)
    assert '"period_s": null' in (tmp_path / "a.json").read_text()
    assert load_availability(tmp_path / "a.json") == trace


def test_availability_json_as_documented_loads(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"period_s": 86400, "edges": {"0": [[0, 600], [900, 1500]], "3": [[5, 6]]}}')
    assert load_availability(path) == AvailabilityTrace({0: ((0.0, 600.0), (900.0, 1500.0)), 3: ((5.0, 6.0),)},
                                                        86400.0)


def test_online_and_offline_at_without_a_period() -> None:
    trace = AvailabilityTrace({0: ((0.0, 10.0), (20.0, 30.0))})
    assert [trace.online(0, t) for t in (0, 9.99, 10, 19.9, 20, 30, 1e9)] == [True, True, False, False, True, False,
                                                                              False]
    assert trace.offline_at(0, 5, 100) == 10 and trace.offline_at(0, 25, 28) is None
    assert trace.offline_at(0, 35, 40) == 35 and trace.offline_at(0, 25, 30) is None
    assert trace.offline_at(0, 5, 5) is None


def test_edges_without_rows_are_unconstrained() -> None:
    trace = AvailabilityTrace({0: ((0.0, 1.0),)}, 10.0)
    assert not trace.has(5) and trace.online(5, 3.0) and trace.offline_at(5, 0, 1e9) is None


def test_edge_with_no_intervals_is_never_online() -> None:
    trace = AvailabilityTrace({4: ()}, 10.0)
    assert trace.has(4) and not trace.online(4, 3.0) and trace.offline_at(4, 2.5, 9) == 2.5


def test_offline_at_with_a_period_handles_wraps_and_spans_of_many_periods() -> None:
    trace = AvailabilityTrace({0: ((0.0, 100.0),), 1: ((0.0, 30.0), (80.0, 100.0)), 2: ((10.0, 100.0),)}, 100.0)
    assert trace.offline_at(0, 5, 1000) is None                                   # online all the time
    assert trace.offline_at(1, 85, 1000) == 130 and trace.offline_at(1, 185, 1000) == 230
    assert trace.offline_at(1, 85, 130) is None and trace.offline_at(1, 85, 130.5) == 130
    assert trace.offline_at(2, 50, 1000) == 100 and trace.offline_at(2, 150, 160) is None
    assert trace.offline_at(2, 250, 1e6) == 300                                   # a span of 10,000 periods


def test_offline_at_matches_a_scan_of_online_on_random_traces() -> None:
    rng = random.Random(7)
    for _ in range(200):
        period = 50.0
        cuts = sorted(rng.sample(range(51), rng.choice([2, 4, 6])))
        spans = tuple((float(a), float(b)) for a, b in zip(cuts[::2], cuts[1::2], strict=True) if a < b)
        merged = AvailabilityTrace({0: tuple(_merged(spans))}, period)
        t0 = rng.randrange(0, 800) / 4
        t1 = t0 + rng.randrange(1, 600) / 4
        scan = next((t0 + k / 4 for k in range(int((t1 - t0) * 4)) if not merged.online(0, t0 + k / 4)), None)
        assert merged.offline_at(0, t0, t1) == scan, (spans, t0, t1)


def _merged(spans: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def test_availability_csv_with_a_wrong_header_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start,end\n0,0,1\n")
    with pytest.raises(TraceError, match=r"a\.csv: the first line must be exactly edge,start_s,end_s"):
        load_availability(path)


def test_availability_csv_with_a_non_numeric_cell_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start_s,end_s\n0,0,ten\n")
    with pytest.raises(TraceError, match=r"a\.csv: line 2: end_s 'ten' is not a number"):
        load_availability(path)


def test_availability_csv_with_end_not_after_start_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start_s,end_s\n0,0,1\n1,5,5\n")
    with pytest.raises(TraceError, match=r"a\.csv: line 3: end_s 5.0 must be greater than start_s 5.0"):
        load_availability(path)


def test_availability_csv_with_a_negative_time_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start_s,end_s\n0,-1,1\n")
    with pytest.raises(TraceError, match=r"line 2: times must be >= 0"):
        load_availability(path)


def test_availability_csv_with_a_negative_edge_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start_s,end_s\n-1,0,1\n")
    with pytest.raises(TraceError, match=r"line 2: edge '-1' is not a non-negative integer"):
        load_availability(path)


def test_availability_csv_with_a_missing_cell_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.csv", "edge,start_s,end_s\n0,1\n")
    with pytest.raises(TraceError, match=r"line 2: expected 3 cells"):
        load_availability(path)


def test_availability_json_interval_beyond_the_period_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"period_s": 100, "edges": {"0": [[90, 110]]}}')
    with pytest.raises(TraceError, match=r"edges\['0'\]: interval \[90.0, 110.0\] goes beyond period_s 100.0"):
        load_availability(path)


def test_availability_json_with_an_unknown_key_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"period": 100, "edges": {}}')
    with pytest.raises(TraceError, match=r"a\.json: unknown keys \['period'\]"):
        load_availability(path)


def test_availability_json_with_a_repeated_edge_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"edges": {"0": [[0, 1]], "0": [[2, 3]]}}')
    with pytest.raises(TraceError, match="key '0' appears twice"):
        load_availability(path)


def test_availability_json_with_a_non_numeric_time_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"edges": {"0": [[0, "1"]]}}')
    with pytest.raises(TraceError, match=r"edges\['0'\]: '1' is not a number"):
        load_availability(path)


def test_availability_json_with_a_zero_period_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"period_s": 0, "edges": {}}')
    with pytest.raises(TraceError, match="period_s: must be > 0"):
        load_availability(path)


def test_availability_file_that_is_not_json_is_refused(tmp_path) -> None:
    path = write(tmp_path / "a.json", '{"edges": {"0": [[0, 1]]')
    with pytest.raises(TraceError, match=r"a\.json: line 1 column \d+: not valid JSON"):
        load_availability(path)


def test_unreadable_availability_file_is_refused(tmp_path) -> None:
    with pytest.raises(TraceError, match=r"missing\.csv: cannot read it"):
        load_availability(tmp_path / "missing.csv")


# --- device traces -----------------------------------------------------------------------------------------------

def test_devices_csv_round_trips(tmp_path) -> None:
    rows = {0: DeviceRow(gflops=12.5, rtt_ms=0.0), 2: DeviceRow(sample_ms=3.0, up_mbps=5.0, down_mbps=20.0),
            7: DeviceRow(rtt_ms=40.0, up_mbps=0.1)}
    write_devices_csv(tmp_path / "d.csv", rows)
    assert (tmp_path / "d.csv").read_text() == ("edge,gflops,sample_ms,up_mbps,down_mbps,rtt_ms\n"
                                                "0,12.5,,,,0\n2,,3,5,20,\n7,,,0.1,,40\n")
    assert load_devices(tmp_path / "d.csv") == rows


def test_devices_csv_columns_may_come_in_any_order(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,up_mbps,sample_ms\n4,2.5,\n1,,12\n")
    assert load_devices(path) == {1: DeviceRow(sample_ms=12.0), 4: DeviceRow(up_mbps=2.5)}


def test_devices_json_loads(tmp_path) -> None:
    path = write(tmp_path / "d.json", '{"edges": {"0": {"sample_ms": 12.5, "up_mbps": 5.0}, "3": {"rtt_ms": 0}}}')
    assert load_devices(path) == {0: DeviceRow(sample_ms=12.5, up_mbps=5.0), 3: DeviceRow(rtt_ms=0.0)}


def test_devices_csv_with_an_unknown_column_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,flops\n0,1\n")
    with pytest.raises(TraceError, match=r"d\.csv: the first line must be 'edge' then distinct columns"):
        load_devices(path)


def test_devices_csv_with_a_repeated_column_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,gflops,gflops\n0,1,2\n")
    with pytest.raises(TraceError, match="distinct columns"):
        load_devices(path)


def test_devices_row_giving_nothing_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,gflops,up_mbps\n0,1,\n1, ,\n")
    with pytest.raises(TraceError, match=r"d\.csv: line 3: gives no value"):
        load_devices(path)


def test_devices_repeated_edge_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,gflops\n0,1\n1,2\n0,3\n")
    with pytest.raises(TraceError, match=r"line 4: edge 0 again \(first on line 2\)"):
        load_devices(path)


def test_devices_zero_speed_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,sample_ms\n0,0\n")
    with pytest.raises(TraceError, match=r"line 2: sample_ms must be > 0, got 0.0"):
        load_devices(path)


def test_devices_negative_rtt_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,rtt_ms\n0,-1\n")
    with pytest.raises(TraceError, match=r"line 2: rtt_ms must be >= 0"):
        load_devices(path)


def test_devices_non_numeric_cell_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.csv", "edge,up_mbps\n0,fast\n")
    with pytest.raises(TraceError, match=r"line 2: up_mbps 'fast' is not a number"):
        load_devices(path)


def test_devices_json_with_an_unknown_key_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.json", '{"edges": {"0": {"sample_ms": 1, "speed": 2}}}')
    with pytest.raises(TraceError, match=r"edges\['0'\]: unknown keys \['speed'\]"):
        load_devices(path)


def test_devices_json_with_the_same_edge_spelled_twice_is_refused(tmp_path) -> None:
    path = write(tmp_path / "d.json", '{"edges": {"1": {"gflops": 1}, "01": {"gflops": 2}}}')
    with pytest.raises(TraceError, match="edge 1 again under another spelling"):
        load_devices(path)


def test_device_row_built_in_code_checks_its_values() -> None:
    with pytest.raises(ValueError, match="up_mbps must be a finite number > 0"):
        DeviceRow(up_mbps=-1.0)


# --- the command ---------------------------------------------------------------------------------------------------

def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="main.py")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_traces_import_fedscale_command_writes_files_and_prints_one_line(tmp_path, fedscale_files, capsys) -> None:
    device, behaviour = fedscale_files
    args = parse(["traces", "import-fedscale", "--device", device, "--behaviour", behaviour,
                  "--out", str(tmp_path / "out"), "--allow-pickle", "--limit", "2"])
    assert cmd_traces(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("imported 2 FedScale clients as edges 0..1: 2 device rows, ")
    assert "1 more left out by --limit" in out
    assert load_devices(tmp_path / "out" / "devices.csv").keys() == {0, 1}


def test_traces_command_without_allow_pickle_raises_a_trace_error(tmp_path, fedscale_files) -> None:
    args = parse(["traces", "import-fedscale", "--device", fedscale_files[0], "--out", str(tmp_path / "out")])
    with pytest.raises(TraceError, match="pass --allow-pickle"):
        cmd_traces(args)
    assert not (tmp_path / "out").exists()


def test_traces_command_refuses_a_limit_of_zero(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        parse(["traces", "import-fedscale", "--out", str(tmp_path), "--limit", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_traces_command_needs_out(capsys) -> None:
    with pytest.raises(SystemExit):
        parse(["traces", "import-fedscale", "--device", "x.pkl"])
    assert "--out" in capsys.readouterr().err


def test_main_py_runs_traces_import_fedscale(tmp_path, fedscale_files) -> None:
    done = subprocess.run([sys.executable, "main.py", "traces", "import-fedscale", "--behaviour", fedscale_files[1],
                           "--out", str(tmp_path / "out"), "--allow-pickle"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("imported 3 FedScale clients as edges 0..2: 3 availability traces; wrote ")
    assert load_availability(tmp_path / "out" / "availability.json").period_s == 1000


def test_main_py_reports_a_refused_pickle_in_one_line_with_exit_2(tmp_path) -> None:
    evil = dump(tmp_path / "evil.pkl", {1: RunsAShellCommand(tmp_path / "SOMEFILE")})
    done = subprocess.run([sys.executable, "main.py", "traces", "import-fedscale", "--device", evil,
                           "--out", str(tmp_path / "out"), "--allow-pickle"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"error: {evil}: the pickle asks for ")
    assert not (tmp_path / "SOMEFILE").exists() and not (tmp_path / "out").exists()
