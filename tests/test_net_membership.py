"""Who is in the network: getSN()'s view across super nodes with liveness, hosted edge nodes, FedPer edge nodes that
keep their personal layers across a restart, and the advertised address. Real servers on loopback."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from chain.keys import NodeKey
from config import Config, ConfigError, load_config
from conftest import wait_until
from fl.participant import FitIns
from fl.weights import state_to_numpy
from node.engine.edge import PERSONAL_FILE, EdgeCore
from node.engine.types import Base
from node.engine.views import MemberView
from node.ledger import Ledger
from node.process.edge import EdgeHost, EdgeNode
from node.process.launch import build_node
from node.process.supernode import SuperNode
from node.rpc.clients import AdminClient, GrpcParticipant

ROOT = Path(__file__).resolve().parent.parent
BEAT = 0.2
MISSED_BEATS = 15   # dropped after 3 s of silence: long enough that a busy test process does not flap members


class Idle:
    """A participant that is never asked to train (membership tests)."""

    participant_id = "idle"
    num_train_samples = 0
    personal_keys = ()


def make_sn(root: Path, name: str, entry: str | None = None) -> SuperNode:
    key = NodeKey.from_seed(name.encode())
    sn = SuperNode(Ledger.open(root / name, key=key), "127.0.0.1:0", Config(data_root=str(root / name)), entry=entry,
                   heartbeat_interval=BEAT, missed_beats=MISSED_BEATS, genesis=False)
    sn.start()
    return sn


def idle_edge(seed: bytes, entry: str, share: int | None = None) -> EdgeNode:
    trainer = EdgeCore(Idle(), NodeKey.from_seed(seed), share=share)  # type: ignore[arg-type]
    edge = EdgeNode(trainer, "127.0.0.1:0", entry, heartbeat_interval=BEAT)
    edge.start()
    return edge


def stop(*nodes) -> None:
    for node in nodes:
        node.stop(None)
        if isinstance(node, SuperNode):
            node.ledger.close()


def view(sn: SuperNode) -> list[MemberView]:
    with AdminClient(sn.address) as admin:
        return admin.nodes()


def by_id(members: list[MemberView]) -> dict[str, MemberView]:
    return {m.node_id: m for m in members}


def test_get_sn_lists_every_super_node_with_its_edges_and_shows_the_dead(tmp_path) -> None:
    entry = make_sn(tmp_path, "entry")
    other = make_sn(tmp_path, "other", entry=entry.address)
    edges = []
    try:
        assert wait_until(lambda: len(entry.registry) == 2)
        for i in range(2):
            edges.append(idle_edge(f"en{i}".encode(), entry.address, share=i))
        assert wait_until(lambda: len(entry.edges) == 1 and len(other.edges) == 1)
        parent = {edges[0].key.node_id: entry, edges[1].key.node_id: other}   # share i -> super node i mod 2

        for sn in (entry, other):    # the same network seen from the entry and from a plain SN
            members = by_id(view(sn))
            assert members[entry.key.node_id].role == "entry" and members[other.key.node_id].role == "supernode"
            for e in edges:
                row = members[e.key.node_id]
                assert row.role == "edge" and row.alive and row.parent_id == parent[e.key.node_id].key.node_id
                assert row.share == edges.index(e) and row.silent_s < 5

        stop(edges[0])
        dead_parent = parent[edges[0].key.node_id]
        assert wait_until(lambda: not by_id(view(entry))[edges[0].key.node_id].alive, timeout=10)
        row = by_id(view(other))[edges[0].key.node_id]
        assert row.parent_id == dead_parent.key.node_id and row.silent_s >= BEAT

        console = subprocess.run([sys.executable, "console.py", "--ip", "127.0.0.1", "--port", str(entry.port),
                                  "-c", "getSN()"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert console.returncode == 0, console.stdout + console.stderr
        assert "DEAD" in console.stdout and edges[0].key.node_id in console.stdout
        assert "2 live super nodes, 1 live edge nodes; 1 dead" in console.stdout
    finally:
        stop(*edges[1:], other, entry)


def test_an_edge_whose_super_node_dies_is_listed_under_a_live_one(tmp_path) -> None:
    entry = make_sn(tmp_path, "entry")
    other = make_sn(tmp_path, "other", entry=entry.address)
    edge = None
    try:
        assert wait_until(lambda: len(entry.registry) == 2)
        edge = idle_edge(b"en", entry.address, share=1)     # share 1 of 2 super nodes: `other`
        assert wait_until(lambda: len(other.edges) == 1)

        stop(other)
        members = by_id(view(entry))

        assert wait_until(lambda: not by_id(view(entry))[other.key.node_id].alive, timeout=10)
        assert wait_until(lambda: by_id(view(entry)).get(edge.key.node_id) is not None and
                          by_id(view(entry))[edge.key.node_id].parent_id == entry.key.node_id, timeout=15)
        assert members[entry.key.node_id].alive
    finally:
        stop(*(n for n in (edge, entry) if n is not None))


def edge_config(root: Path, entry: str, **over) -> Config:
    return Config(dataset="mnist", model="2nn", node_type="EN", entry=entry, port=0, threads=1, heartbeat_s=BEAT,
                  data_root=str(root), **over)


def test_hosted_edge_nodes_each_register_with_their_own_key_port_and_share(tmp_path) -> None:
    entry = make_sn(tmp_path, "entry")
    host = build_node(edge_config(tmp_path / "host", entry.address, partition_index=1, partition_count=4,
                                  hosted_edges=3))
    host.start()
    try:
        assert isinstance(host, EdgeHost) and len(host.nodes) == 3
        assert wait_until(lambda: len(entry.edges) == 3, timeout=15)
        members = [m for m in view(entry) if m.role == "edge"]
        assert sorted(m.share for m in members if m.share is not None) == [1, 2, 3]
        assert len({m.address for m in members}) == 3 and len({m.node_id for m in members}) == 3
        assert all((tmp_path / "host" / f"edge-{i}" / "node.key").exists() for i in (1, 2, 3))
        # Their data shares are distinct, as the simulator's clients 1..3 of 4 are.
        shares = [set(n.core.participant.train_indices.tolist()) for n in host.nodes]
        assert not (shares[0] & shares[1]) and not (shares[1] & shares[2])
    finally:
        stop(host, entry)


def test_hosted_edges_beyond_the_partition_count_are_refused() -> None:
    with pytest.raises(ConfigError, match="hosted_edges"):
        load_config(env={}, flags={"partition_index": 2, "partition_count": 4, "hosted_edges": 3})


def test_a_fedper_edge_node_restarted_on_its_data_root_keeps_its_personal_layers(tmp_path) -> None:
    cfg = edge_config(tmp_path / "en", "127.0.0.1:9", algo="fedper", partition_count=2)  # nothing serves the entry
    node = build_node(cfg)
    node.start()
    try:
        participant = node.core.participant
        initial = participant.personal_state()
        weights = {k: v for k, v in state_to_numpy(participant.workbench.model).items()
                   if k in participant.shared_keys}
        proxy = GrpcParticipant(node.key.node_id, node.address, Base(0, None, weights))
        proxy.fit(weights, FitIns(round=1, epochs=1, batch_size=32, lr=0.05, momentum=0.0, seed=1))
        proxy.close()
        trained = participant.personal_state()
    finally:
        stop(node)
    assert any(not np.array_equal(trained[k], initial[k]) for k in trained)

    again = build_node(cfg)
    restored = again.core.participant.personal_state()

    assert again.key.node_id == node.key.node_id
    assert set(restored) == set(trained) and all(np.array_equal(restored[k], trained[k]) for k in trained)


def test_a_corrupt_personal_layers_file_stops_the_edge_node_with_its_name(tmp_path) -> None:
    cfg = edge_config(tmp_path / "en", "127.0.0.1:9", algo="fedper", partition_count=2)
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / PERSONAL_FILE).write_bytes(b"not a weights blob")

    with pytest.raises(ConfigError, match="delete the file"):
        build_node(cfg)


def test_the_advertised_port_is_the_address_peers_get(tmp_path) -> None:
    cfg = dataclasses.replace(edge_config(tmp_path / "en", "127.0.0.1:9"), ip="127.0.0.1", advertise="10.0.0.5:9100")
    node = build_node(cfg)
    try:
        assert node.address == "10.0.0.5:9100" and node.port != 9100
    finally:
        node.server.stop(None)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        build_node(dataclasses.replace(cfg, advertise="10.0.0.5"))

