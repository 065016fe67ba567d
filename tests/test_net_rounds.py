"""Whole federated rounds over loopback gRPC: Admin.Train on the entry, partials from every SN, co-signed blocks."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from chain.keys import NodeKey
from chain.tensors import model_hash
from chain.verify import verify_chain
from config import Config
from fl.participant import EvalRes, FitIns, FitRes, InProcessParticipant
from node import transport
from node.edge import EdgeNode, edge_participant
from node.ledger import Ledger
from node.setup import configure_torch
from node.coordinator import EdgeRef
from node.simulator import simulate
from fl.strategy import FedAvg
from node.supernode import SuperNode
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import RoundAnnouncement as RoundAnnouncementMsg
from proto.fledger_pb2 import SaveRequest as SaveRequestMsg
from proto.fledger_pb2 import TrainRequest as TrainRequestMsg
from storage.store import LedgerStore

from conftest import wait_until

BEAT = 0.2
# Members are dropped after MISSED_BEATS silent beats (5 s). Building the edge participants holds the GIL for
# seconds in this one process, so the 3-beat default (0.6 s) made SNs and ENs flap and ENs move between SNs.
MISSED_BEATS = 25


def config(root: Path, **over) -> Config:
    return Config(dataset="mnist", model="2nn", clients=4, rounds=2, partition_count=4, threads=1,
                  reproducible=True, data_root=str(root), **over)



class Flaky:
    """A participant that can be made to die in the middle of a round."""

    def __init__(self, inner: InProcessParticipant):
        self.inner, self.participant_id = inner, inner.participant_id
        self.broken = False

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        if self.broken:
            raise RuntimeError("edge node crashed while training")
        return self.inner.fit(weights, ins)

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return self.inner.evaluate(weights)


class Network:
    def __init__(self, root: Path, supernodes: int, edges: int, **over):
        self.root = root
        self.cfg = config(root / "entry", **over)
        configure_torch(self.cfg)
        self.sns: list[SuperNode] = []
        self.ens: list[EdgeNode] = []
        self.flaky: list[Flaky] = []
        self.sns.append(self.make_sn("entry", entry=None))
        for i in range(1, supernodes):
            self.sns.append(self.make_sn(f"sn{i}", entry=self.entry.address))
        assert wait_until(lambda: len(self.entry.registry) == supernodes, timeout=15.0)
        for i in range(edges):
            key = NodeKey.from_seed(f"edge{i}".encode())
            flaky = Flaky(edge_participant(dataclasses.replace(self.cfg, partition_index=i), key.node_id))
            en = EdgeNode(key, flaky, "127.0.0.1:0", self.entry.address, samples=flaky.inner.num_train_samples,
                          heartbeat_interval=BEAT, partition_index=i)
            en.start()
            self.flaky.append(flaky)
            self.ens.append(en)
        assert wait_until(lambda: sum(len(sn.edges) for sn in self.sns) == edges, timeout=15.0), "edge nodes did not join"

    def make_sn(self, name: str, entry: str | None, listen: str = "127.0.0.1:0") -> SuperNode:
        key = NodeKey.from_seed(name.encode())
        ledger = Ledger.open(self.root / name, key=key)
        cfg = dataclasses.replace(self.cfg, data_root=str(self.root / name), is_entry=entry is None)
        sn = SuperNode(key, ledger, listen, entry=entry, heartbeat_interval=BEAT, missed_beats=MISSED_BEATS,
                       cfg=cfg)
        sn.start()
        return sn

    @property
    def entry(self) -> SuperNode:
        return self.sns[0]

    def admin(self, sn: SuperNode) -> fledger_pb2_grpc.AdminStub:
        return fledger_pb2_grpc.AdminStub(transport.open_channel(sn.address))

    def train(self, rounds: int, sn: SuperNode | None = None) -> list:
        return list(self.admin(sn or self.entry).Train(TrainRequestMsg(rounds=rounds), timeout=120))

    def close(self) -> None:
        for node in self.ens + self.sns[::-1]:
            node.stop(None)
        for sn in self.sns:
            sn.ledger.close()


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("net"), supernodes=2, edges=4)
    yield network
    network.close()


def head_models(ledger: Ledger) -> list[str]:
    ledger.flush()
    return [ledger.get_block(h)[0].header.model_hash for h in range(ledger.tip.header.height + 1)]


def test_two_supernodes_with_two_edges_each_train_two_rounds_into_equal_verified_chains(net) -> None:
    assert sorted(len(sn.edges) for sn in net.sns) == [2, 2]

    progress = net.train(2)

    assert [p.round for p in progress] == [1, 2]
    assert all(p.participants == 4 and p.failures == 0 for p in progress)
    assert 0.0 < progress[-1].metrics["accuracy"] <= 1.0 and "train_loss" in progress[-1].metrics
    peer = net.sns[1]
    assert wait_until(lambda: peer.ledger.tip is not None and peer.ledger.tip.hash == net.entry.ledger.tip.hash, timeout=15.0)
    assert progress[-1].block_hash == net.entry.ledger.tip.hash
    for sn in net.sns:
        sn.ledger.flush()
        report = verify_chain(sn.ledger.store, check_models=True)
        assert report.head_hash == net.entry.ledger.tip.hash
        for height in (1, 2):
            block, records = sn.ledger.get_block(height)
            assert len(records) == 4
            assert [r.record.trainer_id for r in records] == sorted(en.key.node_id for en in net.ens)
            assert len(sn.ledger.store.cosignatures(height)) == 2
    assert net.entry.ledger.verify().head_height == 2


def test_a_late_joining_supernode_syncs_the_trained_chain(net) -> None:
    late = net.make_sn("late", entry=net.entry.address)
    try:
        assert wait_until(lambda: late.ledger.tip is not None and late.ledger.tip.hash == net.entry.ledger.tip.hash, timeout=15.0)
        late.ledger.flush()
        assert verify_chain(late.ledger.store, check_models=True).head_hash == net.entry.ledger.tip.hash
    finally:
        late.stop(None)
        late.ledger.close()
        net.entry.registry.remove(late.key.node_id)


def test_save_writes_a_torch_loadable_model_whose_hash_is_the_heads(net, tmp_path) -> None:
    reply = net.admin(net.entry).Save(SaveRequestMsg(path=str(tmp_path / "model.pt")), timeout=30)
    default = net.admin(net.sns[1]).Save(SaveRequestMsg(), timeout=30)

    state = torch.load(reply.path, weights_only=True)
    assert model_hash({k: v.numpy() for k, v in state.items()}) == reply.model_hash
    assert reply.model_hash == net.entry.ledger.tip.header.model_hash == default.model_hash
    assert Path(default.path).parent == net.root / "sn1"


def test_eval_and_status_report_the_global_model(net) -> None:
    admin = net.admin(net.entry)
    reply = admin.Eval(EmptyMsg(), timeout=60)
    status = admin.Status(EmptyMsg(), timeout=10)

    assert reply.samples > 0 and 0.0 < reply.accuracy <= 1.0
    assert not status.training and status.round == net.entry.ledger.tip.header.round


def test_train_on_a_non_entry_supernode_is_refused_clearly(net) -> None:
    with pytest.raises(grpc.RpcError) as info:
        net.train(1, sn=net.sns[1])

    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "entry" in info.value.details()


def test_a_stale_round_announcement_is_refused(net) -> None:
    tip = net.sns[1].ledger.tip
    stub = fledger_pb2_grpc.SuperNodeStub(transport.open_channel(net.sns[1].address))
    ann = RoundAnnouncementMsg(round=tip.header.round, base_height=tip.header.height,
                               base_model_hash=tip.header.model_hash)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnnounceRound(ann, timeout=30))

    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_pause_stops_training_after_the_current_round(net) -> None:
    admin = net.admin(net.entry)
    start = net.entry.ledger.tip.header.round
    stream = admin.Train(TrainRequestMsg(rounds=20), timeout=120)
    first = next(stream)
    admin.Pause(EmptyMsg(), timeout=10)
    rest = list(stream)

    done = [first] + [p for p in rest if p.block_hash]
    assert first.round == start + 1
    assert len(done) <= 2 and "paused" in rest[-1].message
    status = admin.Status(EmptyMsg(), timeout=10)
    assert status.paused and not status.training
    assert net.entry.ledger.tip.header.round == start + len(done)


def test_an_edge_that_dies_mid_run_is_a_failure_not_a_crash(net) -> None:
    net.flaky[3].broken = True
    try:
        progress = net.train(1)
    finally:
        net.flaky[3].broken = False

    assert len(progress) == 1 and progress[0].participants == 3 and progress[0].failures == 1
    _, records = net.entry.ledger.get_block(net.entry.ledger.tip.header.height)
    assert len(records) == 3


def test_one_supernode_with_four_edges_gives_the_simulators_model_hashes(tmp_path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=4)
    try:
        progress = network.train(2)
        assert [p.participants for p in progress] == [4, 4]
        net_models = head_models(network.entry.ledger)
        net_params = network.entry.ledger.get_block(0)[0].header.params
    finally:
        network.close()
    sim_cfg = config(tmp_path / "sim")
    simulate(sim_cfg, fresh=True, progress=False, emit=lambda *_: None)
    store = LedgerStore(f"sqlite:///{tmp_path / 'sim' / 'ledger.db'}")
    try:
        sim_models = [store.get_block(h)[0].header.model_hash for h in range(3)]
        sim_params = store.get_block(0)[0].header.params
    finally:
        store.close()

    assert net_params == sim_params
    assert net_models == sim_models


def test_fraction_selects_clients_across_the_whole_network_as_the_simulator_does(tmp_path) -> None:
    network = Network(tmp_path / "net", supernodes=2, edges=4, fraction=0.25)
    try:
        assert sorted(len(sn.edges) for sn in network.sns) == [2, 2]
        progress = network.train(3)
        trainers = [[r.record.trainer_id for r in network.entry.ledger.get_block(h)[1]] for h in (1, 2, 3)]
    finally:
        network.close()
    share = {en.key.node_id: i for i, en in enumerate(network.ens)}
    expected = [FedAvg(fraction=0.25, seed=0).select(rnd, ["0", "1", "2", "3"]) for rnd in (1, 2, 3)]

    # One client of four per round over both super nodes (selection per SN would give one per SN: two).
    assert [p.participants for p in progress] == [1, 1, 1]
    assert [[str(share[t]) for t in ts] for ts in trainers] == expected


def test_an_entry_restarted_on_its_data_directory_resumes_from_its_head(tmp_path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=2)
    try:
        network.train(1)
        before = network.entry.ledger.tip
        port = network.entry.port
        network.entry.stop(None)
        network.entry.ledger.close()

        network.sns[0] = network.make_sn("entry", entry=None, listen=f"127.0.0.1:{port}")
        resumed = network.entry.ledger.tip
        assert (resumed.hash, resumed.header.model_hash) == (before.hash, before.header.model_hash)
        assert wait_until(lambda: len(network.entry.edges) == 2, timeout=15.0), "edges did not re-join"
        progress = network.train(1)
        network.entry.ledger.flush()
        block, _ = network.entry.ledger.get_block(2)
    finally:
        network.close()

    assert [p.round for p in progress] == [2] and progress[0].participants == 2
    assert block.header.prev_hash == before.hash and block.header.base_model_hash == before.header.model_hash


def test_fedper_over_the_network_shares_base_layers_only_and_matches_the_simulator(tmp_path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=4, algo="fedper")
    try:
        progress = network.train(2)
        reply = network.admin(network.entry).Eval(EmptyMsg(), timeout=60)
        net_models = head_models(network.entry.ledger)
        stored = network.entry.ledger.load_weights(2)
        personal = network.flaky[0].inner.personal_keys
    finally:
        network.close()
    sim_cfg = config(tmp_path / "sim", algo="fedper")
    simulate(sim_cfg, fresh=True, progress=False, emit=lambda *_: None)
    store = LedgerStore(f"sqlite:///{tmp_path / 'sim' / 'ledger.db'}")
    try:
        sim_models = [store.get_block(h)[0].header.model_hash for h in range(3)]
    finally:
        store.close()

    assert personal and not set(personal) & set(stored)            # personal layers never reach the ledger
    assert all(0.0 < p.metrics["personal_accuracy_mean"] <= 1.0 for p in progress)
    assert "accuracy" not in progress[-1].metrics                   # no global model under FedPer
    assert reply.samples == 0 and len(reply.edges) == 4
    assert all(not e.error and e.samples > 0 and 0.0 < e.accuracy <= 1.0 for e in reply.edges)
    assert reply.edge_accuracy_min <= reply.edge_accuracy_mean <= reply.edge_accuracy_max
    assert net_models == sim_models


def test_a_selected_edge_that_no_super_node_has_is_reported_as_a_failure(net) -> None:
    ghost = NodeKey.from_seed(b"ghost").node_id
    coordinator = net.entry.coordinator
    listed = coordinator.all_edges
    coordinator.all_edges = lambda: listed() + [EdgeRef(ghost, "127.0.0.1:1", 9)]   # listed, then gone
    try:
        progress = net.train(1)
    finally:
        coordinator.all_edges = listed

    assert len(progress) == 1 and progress[0].participants == 4 and progress[0].failures == 1
    assert ghost[:12] in progress[0].message and "no live super node" in progress[0].message
