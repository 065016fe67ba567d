"""The simulator under a scenario: the virtual clock's timeline, dropped edge nodes that never train, simulated time
in blocks and outputs, determinism, resume, attacks and relative devices from the scenario, and bad input."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from chain.verify import verify_chain
from config import Config
from node.engine.types import SIM
from node.sim.simulator import prepare, simulate
from storage.store import LedgerStore

ROOT = Path(__file__).resolve().parent.parent
SMALL = Config(model="2nn", clients=6, rounds=2, batch_size=64, lr=0.05, seed=3, threads=1, reproducible=True)

# Six edge nodes (the 2NN, 0.8 MB): edges 0-3 phones on Wi-Fi, edge 4 a Raspberry Pi 3 on 4G, and edge 5 on a
# satellite link, which misses the 3 s deadline every round; over-commitment 1.5 of K = 4 (fraction 2/3) keeps the
# first four to finish.
SCENARIO = """
[network]
super_nodes = 2
edge_nodes = 6
[defaults]
device = "phone"
link = "wifi"
[[edges]]
select = "4"
device = "rpi3"
link = "4g"
[[edges]]
select = "5"
link = "satellite"
[round]
deadline_s = 3
overcommit = 1.5
"""


def run(cfg: Config, **kw) -> dict:
    return simulate(cfg, progress=False, emit=lambda _line: None, **kw)


def scenario_cfg(tmp_path: Path, text: str = SCENARIO, name: str = "s.toml", **kw) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / name
    path.write_text(text)
    return replace(SMALL, scenario=str(path), data_root=str(tmp_path / "root"), fraction=4 / 6, **kw)


def blocks(url: str) -> list:
    store = LedgerStore(url)
    try:
        return [store.get_block(h) for h in range(store.count())]
    finally:
        store.close()


def test_dropped_edge_nodes_are_never_trained_and_the_block_lists_them(tmp_path):
    cfg = scenario_cfg(tmp_path)
    fits: list[int] = []
    sim = prepare(cfg, fresh=True, super_nodes=2, on_fit=lambda: fits.append(1))
    try:
        sim.coordinator.genesis(validators=sim.validators)
        report = sim.coordinator.run_round(1)
        trainers = {r.record.trainer_id for r in sim.ledger.get_block(1)[1]}
    finally:
        sim.close()

    assert report.sim is not None
    assert len(fits) == len(report.sim.kept) == report.participants == 4
    dropped = dict(report.dropped)
    assert len(report.sim.timings) == 6 and len(dropped) == 2
    assert any(why.startswith("misses the deadline") for why in dropped.values())
    assert trainers == set(report.sim.kept) and not trainers & set(dropped)
    sim_params = report.block.header.params[SIM]
    assert sim_params["round_ms"] == round(report.sim.round_s * 1000)
    assert [edge for edge, _ in sim_params["dropped"]] == list(dropped)


def test_same_seed_gives_the_same_timeline_dropped_edges_and_block_hashes(tmp_path):
    cfg = scenario_cfg(tmp_path, db=f"sqlite:///{tmp_path / 'a.db'}")
    first = run(cfg, out_dir=str(tmp_path / "oa"), super_nodes=2, fresh=True)
    again = run(cfg, out_dir=str(tmp_path / "ob"), super_nodes=2, fresh=True)   # the same keys: the same hashes
    elsewhere = run(scenario_cfg(tmp_path / "other", db=f"sqlite:///{tmp_path / 'c.db'}"),
                    out_dir=str(tmp_path / "oc"), super_nodes=2)                 # other keys: the same timeline

    assert first["head_hash"] == again["head_hash"] != elsewhere["head_hash"]
    timelines = [json.loads((tmp_path / out / "timeline.json").read_text()) for out in ("oa", "ob", "oc")]
    assert timelines[0] == timelines[1]
    # Node ids come from keys; the edge nodes' indices, fates and times do not.
    assert [[{k: v for k, v in e.items() if k not in ("edge", "sn")} for e in r["edges"]] for r in timelines[0]] \
        == [[{k: v for k, v in e.items() if k not in ("edge", "sn")} for e in r["edges"]] for r in timelines[2]]
    assert first["sim_time_s"] == again["sim_time_s"] == elsewhere["sim_time_s"] > 0


def test_another_seed_gives_another_timeline(tmp_path):
    run(scenario_cfg(tmp_path / "a", db=f"sqlite:///{tmp_path / 'a.db'}"), out_dir=str(tmp_path / "oa"))
    run(scenario_cfg(tmp_path / "b", db=f"sqlite:///{tmp_path / 'b.db'}", seed=4), out_dir=str(tmp_path / "ob"))

    assert (tmp_path / "oa" / "timeline.json").read_text() != (tmp_path / "ob" / "timeline.json").read_text()


def test_outputs_carry_simulated_time_beside_wall_time(tmp_path):
    cfg = scenario_cfg(tmp_path, db=f"sqlite:///{tmp_path / 'l.db'}")
    result = run(cfg, out_dir=str(tmp_path / "out"), super_nodes=2)

    with open(tmp_path / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    timeline = json.loads((tmp_path / "out" / "timeline.json").read_text())
    assert [float(r["sim_time_s"]) for r in rows] == pytest.approx(
        [rows_sum := float(rows[0]["sim_round_s"]), rows_sum + float(rows[1]["sim_round_s"])], abs=2e-3)
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert summary["summary"]["sim_time_s"] == result["sim_time_s"] == pytest.approx(float(rows[-1]["sim_time_s"]))
    assert [t["round"] for t in timeline] == [1, 2] and len(timeline[0]["edges"]) == 6
    assert "accuracy vs simulated time" in (tmp_path / "out" / "plot.svg").read_text()
    assert "not among the first" in (tmp_path / "out" / "timeline.svg").read_text()
    store = LedgerStore(cfg.db or "")
    try:
        verify_chain(store)
    finally:
        store.close()


def test_a_resumed_run_continues_the_clock_from_the_head(tmp_path):
    db = f"sqlite:///{tmp_path / 'l.db'}"
    whole = run(scenario_cfg(tmp_path / "w", db=f"sqlite:///{tmp_path / 'w.db'}", rounds=3))
    run(scenario_cfg(tmp_path / "r", db=db, rounds=2))
    resumed = run(scenario_cfg(tmp_path / "r", db=db, rounds=3))

    assert resumed["rounds_run"] == 1
    assert resumed["sim_time_s"] == whole["sim_time_s"]


def test_attacks_named_in_the_scenario_run_on_their_edge_nodes(tmp_path):
    text = SCENARIO + '\n[[edges]]\nselect = "1-2"\nattack = "sign-flip:scale=5"\n'
    result = run(scenario_cfg(tmp_path, text, db=f"sqlite:///{tmp_path / 'l.db'}", rounds=1))

    assert result["attackers"] == ["client-001", "client-002"]


def test_relative_devices_record_the_machine_rate_and_a_resume_reuses_it(tmp_path):
    text = SCENARIO.replace('device = "phone"', "device = { speed = 0.5 }")
    db = f"sqlite:///{tmp_path / 'l.db'}"
    first = run(scenario_cfg(tmp_path, text, db=db, rounds=1))
    genesis = blocks(db)[0][0]
    resumed = run(scenario_cfg(tmp_path, text, db=db, rounds=2))

    assert float(genesis.header.params["host_gflops"]) == first["host_gflops"] == resumed["host_gflops"] > 0


def test_a_round_nobody_can_make_moves_the_clock_on_and_gives_up_with_a_message(tmp_path):
    (tmp_path / "s.toml").write_text("[network]\nedge_nodes = 6\n[defaults]\ndevice = \"rpi3\"\nlink = \"3g\"\n"
                                     "[round]\ndeadline_s = 2\n")

    result = subprocess.run([sys.executable, "main.py", "simulate", "--scenario", str(tmp_path / "s.toml"),
                             "--model", "2nn", "--rounds", "1", "--fresh", "--no-progress",
                             "--data-root", str(tmp_path / "root")], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)

    assert result.returncode == 1
    assert "no edge node could train in 100 tries" in result.stderr
    assert result.stdout.count("nobody could train") == 100


@pytest.mark.parametrize(("extra", "message"), [
    (["--scenario", "missing.toml"], "cannot read scenario missing.toml"),
    (["--scenario", "{bad}", "--clients", "9"], "describes 6"),
])
def test_bad_scenario_input_is_one_line_and_exit_2(tmp_path, extra, message):
    (tmp_path / "bad.toml").write_text(SCENARIO)
    extra = [str(tmp_path / "bad.toml") if e == "{bad}" else e for e in extra]

    result = subprocess.run([sys.executable, "main.py", "simulate", "--rounds", "1", "--no-progress",
                             "--data-root", str(tmp_path / "root"), *extra], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)

    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_share_size_gives_every_client_its_own_draw_with_overlap():
    from fl.data import load_dataset
    from node.run import client_shares
    dataset = load_dataset("mnist", None, False)
    cfg = Config(clients=1000, share_size=40, seed=0)

    shares = client_shares(cfg, dataset, 1000)

    assert len(shares) == 1000 and all(len(set(train.tolist())) == 40 for train, _ in shares)
    covered = set().union(*(set(train.tolist()) for train, _ in shares))
    assert len(covered) <= len(dataset.train_y) < 1000 * 40   # 40,000 draws from 4,000 images overlap
    again = client_shares(cfg, dataset, 1000)
    assert all((a == b).all() for (a, _), (b, _) in zip(shares, again, strict=True))


def test_share_size_refuses_a_non_iid_partition_and_too_many_images():
    from config import ConfigError, load_config
    from fl.data import load_dataset
    from node.run import client_shares
    with pytest.raises(ConfigError, match="does not combine with partition 'dirichlet'"):
        load_config(env={}, flags={"share_size": 40, "partition": "dirichlet"})
    with pytest.raises(ConfigError, match="more than the 4000 training images"):
        client_shares(Config(share_size=4001), load_dataset("mnist", None, False), 2)
