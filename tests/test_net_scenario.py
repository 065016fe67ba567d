"""A scenario on the network of real gRPC nodes: the proposer plans each round on the virtual clock as the
simulator does (the same edge nodes dropped, the same models), and every node spends its profile's time for real."""
from __future__ import annotations

from pathlib import Path

from network import Network, model_hashes
from node.engine.types import SIM
from node.sim.simulator import simulate
from storage.store import LedgerStore

# Four edge nodes on a LAN; edge 3 sits behind a satellite link and misses the 2 s deadline every round.
DROPPING = """
[network]
super_nodes = 2
edge_nodes = 4
[defaults]
device = "laptop"
link = "lan"
[[edges]]
select = "3"
link = "satellite"
[round]
deadline_s = 2
"""

# Slow links and a slow device: the round is dominated by time the nodes must spend (about 1.6 s each way for the
# 2NN's 0.8 MB at 4 Mbit/s, 1.2 s of training padded up from a few milliseconds).
SLOW = """
[network]
super_nodes = 1
edge_nodes = 2
[defaults]
device = { gflops = 1 }
link = { rtt_ms = 20, up_mbps = 4, down_mbps = 4 }
"""


def write(tmp_path: Path, text: str) -> str:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return str(path)


def simulated(root: Path, scenario: str, super_nodes: int, rounds: int) -> tuple[list[str], list[dict]]:
    from network import config
    result = simulate(config(root, scenario=scenario, rounds=rounds), fresh=True, progress=False,
                      emit=lambda *_: None, super_nodes=super_nodes)
    store = LedgerStore(result["db"])
    try:
        headers = [store.get_block(h)[0].header for h in range(result["head_height"] + 1)]
    finally:
        store.close()
    return [h.model_hash for h in headers], [h.params[SIM] for h in headers if SIM in h.params]


def test_the_network_drops_the_edges_the_simulator_drops_and_gives_its_models(tmp_path: Path) -> None:
    scenario = write(tmp_path, DROPPING)
    network = Network(tmp_path / "net", supernodes=2, edges=4, scenario=scenario)
    try:
        progress = network.train(2)
        net_models = model_hashes(network.entry.ledger)
        head = network.head()
        net_sim = network.entry.ledger.get_block(head.height)[0].header.params[SIM]
    finally:
        network.close()
    sim_models, sim_params = simulated(tmp_path / "sim", scenario, 2, 2)

    assert [p.participants for p in progress] == [3, 3]
    assert [len(p.dropped) for p in progress] == [1, 1] and "misses the deadline" in progress[0].dropped[0][1]
    assert all("sim_round_s" in p.timings and "sim_time_s" in p.timings for p in progress)
    assert net_models == sim_models
    assert [why for _, why in net_sim["dropped"]] == [why for _, why in sim_params[-1]["dropped"]]
    assert net_sim["round_ms"] == sim_params[-1]["round_ms"]   # the same plan: the backbone takes its mean


def test_every_node_spends_its_profile_time_for_real(tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=2, scenario=write(tmp_path, SLOW))
    try:
        progress = network.train(1)
    finally:
        network.close()

    (line,) = progress
    planned, spent = line.timings["sim_round_s"], line.timings["round_s"] - line.timings["evaluate_s"]
    assert planned > 4.0
    assert spent >= planned, f"the round took {spent:.2f} s, less than the {planned:.2f} s its profiles take"
