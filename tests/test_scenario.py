"""Scenario files, the device and link time model, and the virtual clock's plans: known values, determinism, and
each way a round drops an edge node (offline, deadline, not among the first K)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from config import ConfigError
from node.engine.clock import VirtualClock
from node.engine.profiles import DEVICES, LINKS, DeviceProfile, LinkProfile, jitter_draw, parse_device, parse_link
from node.engine.scenario import load_scenario, parse_indices
from node.engine.types import EdgeRef

FLOPS = 73_000_000   # about the MNIST CNN's training FLOPs per sample
MODEL = 6_600_000    # about its encoded size in bytes

ISSUE_EXAMPLE = """
[network]
super_nodes = 2
edge_nodes = 20
[defaults]                     # every edge node, unless a later [[edges]] entry says otherwise
device = "rpi4"                # a preset name, or { speed = 0.25 } relative to this machine
link = "wifi"
availability = "always"
[[edges]]
select = "0-4"                 # edge node indices
device = "phone"
link = "4g"
attack = "sign-flip:scale=5"
[links]
backbone = "lan"
[round]
deadline_s = 60
overcommit = 1.3
"""


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edges(count: int, samples: int = 100) -> list[EdgeRef]:
    return [EdgeRef(f"edge-{i:03d}", "", i, samples) for i in range(count)]


def clock_for(tmp_path: Path, text: str, seed: int = 0, fraction: float = 1.0) -> VirtualClock:
    return VirtualClock(load_scenario(write(tmp_path, text)), seed, FLOPS, 1, fraction)


def test_the_issue_example_parses_with_each_entry_applied_to_its_edges(tmp_path):
    scenario = load_scenario(write(tmp_path, ISSUE_EXAMPLE))

    assert (scenario.super_nodes, scenario.edge_nodes, scenario.deadline_s, scenario.overcommit) == (2, 20, 60.0, 1.3)
    assert [e.device.name for e in scenario.edges[:6]] == ["phone"] * 5 + ["rpi4"]
    assert [e.link.name for e in scenario.edges[4:6]] == ["4g", "wifi"]
    assert scenario.edges[0].attack == "sign-flip:scale=5" and scenario.edges[5].attack is None
    assert scenario.backbone == LINKS["lan"]


def test_the_digest_follows_the_conditions_not_the_comments(tmp_path):
    plain = load_scenario(write(tmp_path, ISSUE_EXAMPLE, "a.toml"))
    commented = load_scenario(write(tmp_path, ISSUE_EXAMPLE + "\n# a comment\n", "b.toml"))
    slower = load_scenario(write(tmp_path, ISSUE_EXAMPLE.replace("deadline_s = 60", "deadline_s = 61"), "c.toml"))

    assert plain.digest == commented.digest != slower.digest


@pytest.mark.parametrize(("text", "message"), [
    ("[netwrk]\nedge_nodes = 2", "unknown table [netwrk]"),
    ("[network]\nedge_nodes = 0", "edge_nodes must be an integer >= 1"),
    ("[defaults]\ndevice = \"toaster\"", "unknown device 'toaster'"),
    ("[defaults]\nlink = { rtt_ms = 10, up_mbps = 5 }", "needs down_mbps"),
    ("[defaults]\nlink = { rtt_ms = 10, up_mbps = 5, down_mbps = 5, loss = 1.0 }",
     "loss must be a number >= 0 and < 1"),
    ("[defaults]\ndevice = { speed = -1 }", "speed must be a number > 0"),
    ("[[edges]]\ndevice = \"rpi3\"", "needs select"),
    ("[network]\nedge_nodes = 4\n[[edges]]\nselect = \"2-9\"\ndevice = \"rpi3\"", "outside 0..3"),
    ("[[edges]]\nselect = \"0\"\nattack = \"teleport\"", "attack"),
    ("[round]\novercommit = 0.5", "overcommit must be a number >= 1"),
    ("[round]\ndeadline_s = 0", "deadline_s must be a number > 0"),
    ("[defaults]\navailability = { mean_on_s = 10, mean_off_s = -1 }", "mean_off_s must be a number > 0"),
    ("[defaults]\navailability = { mean_on_s = 10 }", "availability is"),
    ("[defaults]\navailability = { trace = \"nowhere.csv\" }", "does not exist"),
    ("[network\n", "not valid TOML"),
])
def test_a_bad_scenario_is_refused_with_a_message_naming_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_scenario(write(tmp_path, text))


def test_indices_take_ranges_and_single_numbers():
    assert parse_indices("0-2,5, 7-8", 10, "x") == [0, 1, 2, 5, 7, 8]
    with pytest.raises(ConfigError, match="not an index"):
        parse_indices("a-b", 10, "x")


def test_a_transfer_takes_latency_jitter_payload_and_retransmissions():
    link = LinkProfile("l", rtt_ms=100.0, up_mbps=8.0, down_mbps=16.0, jitter_ms=10.0, loss=0.01)
    nbytes = 1_000_000

    down = link.transfer_s(nbytes, up=False, draw=-1.5)

    segments = math.ceil(nbytes / 1460)
    assert down == pytest.approx(0.05 + 0.015 + 8 * (nbytes + 40 * segments) / (16e6 * 0.99) + segments * 0.01 * 0.1)
    assert link.transfer_s(nbytes, up=True) > down   # the slower uplink, even without jitter


def test_presets_are_all_there_with_sane_numbers():
    assert {"rpi4", "rpi3", "jetson-nano", "phone", "laptop"} <= set(DEVICES)
    assert {"lan", "wifi", "4g", "3g", "satellite"} <= set(LINKS)
    assert DEVICES["rpi3"].gflops < DEVICES["rpi4"].gflops < DEVICES["laptop"].gflops
    assert LINKS["lan"].rtt_ms < LINKS["wifi"].rtt_ms < LINKS["4g"].rtt_ms < LINKS["3g"].rtt_ms \
        < LINKS["satellite"].rtt_ms


def test_device_forms_give_their_seconds_per_sample():
    assert parse_device({"gflops": 2}, "x").seconds_per_sample(4e9, None) == 2.0
    assert parse_device({"sample_ms": 30}, "x").seconds_per_sample(4e9, None) == 0.03
    assert parse_device({"speed": 0.5}, "x").seconds_per_sample(4e9, 8.0) == 1.0
    with pytest.raises(ConfigError, match="relative to this machine"):
        DeviceProfile("r", relative=0.5).seconds_per_sample(4e9, None)
    assert parse_link("4g", "x") == LINKS["4g"]


def test_jitter_draws_are_fixed_by_their_keys():
    assert jitter_draw(0, 3, "edge7", "down") == jitter_draw(0, 3, "edge7", "down")
    assert len({jitter_draw(0, 3, "edge7", "down"), jitter_draw(0, 3, "edge7", "up"),
                jitter_draw(1, 3, "edge7", "down"), jitter_draw(0, 4, "edge7", "down")}) == 4


def test_an_edge_phase_times_follow_its_device_and_link(tmp_path):
    clock = clock_for(tmp_path, "[network]\nedge_nodes = 1\n[defaults]\ndevice = { gflops = 7.3 }\n"
                                "link = { rtt_ms = 0, up_mbps = 8, down_mbps = 80 }")

    plan = clock.plan(1, edges(1, samples=100), {}, "sn0", [], MODEL, forwards=False)

    t = plan.timings[0]
    assert (t.status, t.reason) == ("trained", None)
    assert t.compute_s == pytest.approx(100 * FLOPS / 7.3e9)
    wire = MODEL + 40 * math.ceil(MODEL / 1460)   # the payload and its IP and TCP headers
    assert (t.down_s, t.up_s) == (pytest.approx(wire * 8 / 80e6), pytest.approx(wire * 8 / 8e6))
    assert plan.round_s == pytest.approx(t.down_s + t.compute_s + t.up_s)


def test_an_edge_that_would_miss_the_deadline_is_dropped_and_says_when_it_would_finish(tmp_path):
    clock = clock_for(tmp_path, "[network]\nedge_nodes = 4\n[defaults]\ndevice = \"laptop\"\nlink = \"lan\"\n"
                                "[[edges]]\nselect = \"2\"\nlink = \"3g\"\n[round]\ndeadline_s = 20")

    plan = clock.plan(1, edges(4), {}, "sn0", [], MODEL, forwards=False)

    assert plan.kept == ["edge-000", "edge-001", "edge-003"]
    (edge, why), = plan.dropped
    assert edge == "edge-002" and why.startswith("misses the deadline (would finish at")
    assert plan.round_s < 20


def test_overcommit_selects_more_and_keeps_the_first_k_to_finish(tmp_path):
    clock = clock_for(tmp_path, "[network]\nedge_nodes = 10\n[defaults]\ndevice = \"laptop\"\nlink = \"wifi\"\n"
                                "[[edges]]\nselect = \"0-4\"\ndevice = \"rpi3\"\n[round]\novercommit = 1.5",
                      fraction=0.4)

    plan = clock.plan(1, edges(10), {}, "sn0", [], MODEL, forwards=False)

    assert len(plan.timings) == 6 and len(plan.kept) == 4   # ceil(1.5 x 4) selected, K = 4 kept
    kept = [t for t in plan.timings if t.status == "trained"]
    late = [t for t in plan.timings if t.status == "dropped"]
    assert max(t.finish_s for t in kept) <= min(t.finish_s for t in late)
    assert all(t.reason == "not among the first 4 to finish" for t in late)


def test_an_edge_offline_at_the_start_is_not_selected_and_one_going_offline_is_dropped(tmp_path):
    trace = write(tmp_path, "edge,start_s,end_s\n0,0,1000\n1,500,1000\n2,0,1\n", "avail.csv")
    clock = clock_for(tmp_path, "[network]\nedge_nodes = 3\n[defaults]\ndevice = \"rpi4\"\nlink = \"lan\"\n"
                                f"availability = {{ trace = \"{trace.name}\" }}")

    plan = clock.plan(1, edges(3), {}, "sn0", [], MODEL, forwards=False)

    assert plan.available == 2 and [t.edge for t in plan.timings] == ["edge-000", "edge-002"]
    assert plan.kept == ["edge-000"]
    assert plan.dropped[0][0] == "edge-002" and "went offline at 1.0 s" in plan.dropped[0][1]


def test_markov_availability_is_seeded_and_extending_it_keeps_the_past(tmp_path):
    text = "[network]\nedge_nodes = 3\n[defaults]\navailability = { mean_on_s = 100, mean_off_s = 50 }"
    one, two = load_scenario(write(tmp_path, text, "a.toml")), load_scenario(write(tmp_path, text, "b.toml"))

    early = [one.offline_at(1, 7, t, t + 1) for t in range(0, 2000, 37)]
    two.offline_at(1, 7, 0, 50_000)   # draws far ahead first
    again = [two.offline_at(1, 7, t, t + 1) for t in range(0, 2000, 37)]

    assert early == again
    assert any(x is None for x in early) and any(x is not None for x in early)
    share_on = sum(x is None for x in (one.offline_at(2, 7, t, t + 0.01) for t in range(0, 200_000, 97)))
    assert 0.55 < share_on / len(range(0, 200_000, 97)) < 0.78   # mean_on / (on + off) = 2/3


def test_the_same_seed_gives_the_same_plan_and_another_seed_another(tmp_path):
    text = ISSUE_EXAMPLE.replace('availability = "always"', "availability = { mean_on_s = 300, mean_off_s = 300 }")
    plans = [clock_for(tmp_path, text, seed=s, fraction=0.5).plan(3, edges(20), {}, "sn0", ["sn1"], MODEL, True)
             for s in (0, 0, 1)]

    assert plans[0].row() == plans[1].row()
    assert plans[0].row() != plans[2].row()


def test_backbone_time_counts_for_super_nodes_other_than_the_proposer(tmp_path):
    text = "[network]\nedge_nodes = 2\n[defaults]\ndevice = \"laptop\"\nlink = \"lan\"\n[links]\nbackbone = \"4g\""
    clock = clock_for(tmp_path, text)
    holder = {"edge-000": "sn0", "edge-001": "sn1"}

    alone = clock.plan(1, edges(2), {e: "sn0" for e in holder}, "sn0", [], MODEL, forwards=False)
    spread = clock.plan(1, edges(2), holder, "sn0", ["sn1"], MODEL, forwards=False)

    backbone = LINKS["4g"]
    assert spread.phases["cosign_s"] > MODEL * 8 / (backbone.down_mbps * 1e6)
    assert spread.round_s > alone.round_s + MODEL * 8 / (backbone.up_mbps * 1e6)   # sn1's partial goes up the 4g


def test_a_round_nobody_can_make_keeps_nobody_and_lasts_its_deadline(tmp_path):
    clock = clock_for(tmp_path, "[network]\nedge_nodes = 2\n[defaults]\ndevice = \"rpi3\"\nlink = \"3g\"\n"
                                "[round]\ndeadline_s = 5")

    plan = clock.plan(1, edges(2), {}, "sn0", [], MODEL, forwards=False)

    assert plan.kept == [] and plan.round_s == 5.0 and len(plan.dropped) == 2


def test_block_params_hold_integer_milliseconds_and_the_dropped(tmp_path):
    clock = clock_for(tmp_path, "[network]\nedge_nodes = 3\n[defaults]\nlink = \"lan\"\n[[edges]]\nselect = \"1\"\n"
                                "link = \"satellite\"\n[round]\ndeadline_s = 5")
    clock.now_s = 12.25

    params = clock.plan(2, edges(3), {}, "sn0", [], MODEL, forwards=False).params()

    assert isinstance(params["round_ms"], int) and isinstance(params["clock_ms"], int)
    assert params["clock_ms"] == 12250 + params["round_ms"]
    assert [edge for edge, _ in params["dropped"]] == ["edge-001"]


def test_the_example_scenario_in_the_repository_loads():
    scenario = load_scenario(Path(__file__).resolve().parent.parent / "examples" / "edge.toml")

    assert scenario.edge_nodes == 20 and scenario.edges[0].attack == "sign-flip:scale=5"
    assert scenario.edges[19].availability.kind == "markov"
