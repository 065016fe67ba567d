"""Whole federated rounds over loopback gRPC: training on the entry, partials from every super node, co-signed
blocks, and the same model hashes as `simulate --sn K` for the same seed."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from chain.keys import NodeKey
from chain.tensors import model_hash
from chain.validators import is_membership
from chain.verify import verify_chain
from conftest import wait_until
from fl.strategy import FedAvg
from network import Network, config, model_hashes
from node.engine.errors import BadRequestError
from node.engine.types import EdgeRef
from node.rpc import transport
from node.sim.simulator import simulate
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import RoundAnnouncement as RoundAnnouncementMsg
from proto.fledger_pb2 import RoundPlan as RoundPlanMsg
from storage.store import LedgerStore


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    network = Network(tmp_path_factory.mktemp("net"), supernodes=2, edges=4)
    yield network
    network.close()


def simulated_model_hashes(root: Path, super_nodes: int, **over: Any) -> list[str]:
    result = simulate(config(root, **over), fresh=True, progress=False, emit=lambda *_: None,
                      super_nodes=super_nodes)
    store = LedgerStore(result["db"])
    try:
        return [store.get_block(h)[0].header.model_hash for h in range(result["head_height"] + 1)]
    finally:
        store.close()


def test_edge_nodes_go_to_super_node_share_mod_k_in_join_order(net: Network) -> None:
    first, second = net.sns
    assert {m.share for m in first.edges.members()} == {0, 2}
    assert {m.share for m in second.edges.members()} == {1, 3}


def test_two_supernodes_train_two_rounds_into_equal_verified_chains(net: Network) -> None:
    progress = net.train(2)

    assert [p.round for p in progress] == [1, 2]
    assert all(p.participants == 4 and p.failures == 0 for p in progress)
    assert 0.0 < progress[-1].metrics["accuracy"] <= 1.0 and "train_loss" in progress[-1].metrics
    head = net.entry.ledger.head
    assert head is not None and progress[-1].block_hash == head.hash
    peer = net.sns[1]
    assert wait_until(lambda: peer.ledger.head == net.entry.ledger.head, timeout=15.0)
    # block 1 admitted sn1 to the validator set, so rounds 1 and 2 are blocks 2 and 3, co-signed by both
    assert is_membership(net.block(1).header) and head.height == 3
    for sn in net.sns:
        sn.ledger.flush()
        report = verify_chain(sn.ledger.store, check_models=True)
        assert report.head_hash == head.hash and set(report.validators) == {s.key.public_hex for s in net.sns}
        for height in (2, 3):
            _, records = sn.ledger.get_block(height)
            # records in data-share order, whichever super node trained them
            assert [r.record.trainer_id for r in records] == [en.key.node_id for en in net.ens]
            assert len(sn.ledger.store.cosignatures(height)) == 2


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["fedavg", "fedper"])
def test_two_super_nodes_give_the_model_hashes_of_simulate_sn_2(tmp_path: Path, algo: str) -> None:
    network = Network(tmp_path / "net", supernodes=2, edges=4, algo=algo)
    try:
        progress = network.train(2)
        net_models = model_hashes(network.entry.ledger)
        peer_models = model_hashes(network.sns[1].ledger)
    finally:
        network.close()
    sim_models = simulated_model_hashes(tmp_path / "sim", 2, algo=algo)

    assert [p.participants for p in progress] == [4, 4]
    assert net_models == peer_models == sim_models


def test_one_super_node_gives_the_model_hashes_of_simulate(tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=4)
    try:
        network.train(2)
        net_models = model_hashes(network.entry.ledger)
        net_params = network.entry.ledger.get_block(0)[0].header.params
    finally:
        network.close()
    sim_models = simulated_model_hashes(tmp_path / "sim", 1)
    sim_params = LedgerStore(f"sqlite:///{tmp_path / 'sim' / 'ledger.db'}").get_block(0)[0].header.params

    assert net_params == sim_params
    assert net_models == sim_models


def test_a_late_joining_supernode_syncs_the_trained_chain(net: Network) -> None:
    late = net.make_sn("late", entry=net.entry.address)
    try:
        # It syncs, is admitted to the validator set by a membership block, and syncs that block too.
        assert wait_until(lambda: late.key.public_hex in net.entry.ledger.validators, timeout=30.0)
        assert wait_until(lambda: late.ledger.head == net.entry.ledger.head, timeout=15.0)
        late.ledger.flush()
        head = net.entry.ledger.head
        assert head is not None and verify_chain(late.ledger.store, check_models=True).head_hash == head.hash
    finally:
        late.stop(None)
        late.ledger.close()
    assert wait_until(lambda: len(net.entry.registry) == 2, timeout=15.0), "the stopped late joiner stays listed"
    # Take the dead validator out again (2 of its 3 validators are alive), so the later tests train as before.
    net.entry.remove_supernode(late.key.node_id)
    assert len(net.entry.ledger.validators) == 2


def test_save_writes_a_torch_loadable_model_whose_hash_is_the_heads(net: Network, tmp_path: Path) -> None:
    with net.admin() as admin, net.admin(net.sns[1]) as peer_admin:
        path, digest = admin.save("model.pt")
        default_path, default_digest = peer_admin.save("")
        with pytest.raises(BadRequestError, match="models"):
            admin.save(str(tmp_path / "outside.pt"))     # never outside DATA_ROOT/models

    state = torch.load(path, weights_only=True)
    head = net.entry.ledger.head
    assert head is not None
    assert model_hash({k: v.numpy() for k, v in state.items()}) == digest
    assert digest == head.model_hash == default_digest
    assert Path(path) == net.root / "entry" / "models" / "model.pt"
    assert Path(default_path).parent == net.root / "sn1" / "models"
    assert Path(path).stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "outside.pt").exists()


def test_eval_and_status_report_the_global_model(net: Network) -> None:
    with net.admin() as admin:
        report = admin.evaluate()
        status = admin.status()

    head = net.entry.ledger.head
    assert report.samples > 0 and 0.0 < report.accuracy <= 1.0
    assert head is not None and not status.training and status.round == head.round


def test_any_validator_can_be_told_to_train_and_the_entry_takes_the_lead_back(net: Network) -> None:
    lines = [line for line in net.train(1, sn=net.sns[1]) if line.finished]   # sn1 takes the lead (a view change)
    assert len(lines) == 1
    block = net.block(lines[0].height)
    assert block.header.proposer_id == net.sns[1].key.node_id
    with net.admin(net.sns[1]) as admin:
        assert admin.status().proposer == net.sns[1].key.node_id

    lines = [line for line in net.train(1) if line.finished]   # the entry leads a newer view again
    assert len(lines) == 1 and net.block(lines[0].height).header.proposer_id == net.entry.key.node_id
    assert wait_until(lambda: net.sns[1].ledger.head == net.entry.ledger.head, timeout=15.0)


def test_a_stale_round_announcement_is_refused(net: Network) -> None:
    head = net.sns[1].ledger.head
    assert head is not None
    stub = fledger_pb2_grpc.SuperNodeStub(transport.open_channel(net.sns[1].address))
    announcement = RoundAnnouncementMsg(round=head.round, base_height=head.height, base_model_hash=head.model_hash,
                                        proposer_id=net.entry.key.node_id,
                                        plan=RoundPlanMsg(algorithm="fedavg", lr=0.05, local_epochs=1,
                                                          batch_size=32))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnnounceRound(announcement, timeout=30))

    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_announcement_without_a_plan_is_refused_as_invalid(net: Network) -> None:
    head = net.sns[1].ledger.head
    assert head is not None
    stub = fledger_pb2_grpc.SuperNodeStub(transport.open_channel(net.sns[1].address))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.AnnounceRound(RoundAnnouncementMsg(round=head.round + 1, base_height=head.height,
                                                     base_model_hash=head.model_hash), timeout=30))

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_pause_stops_training_after_the_current_round(net: Network) -> None:
    head = net.entry.ledger.head
    assert head is not None
    start = head.round
    with net.admin() as admin:
        stream = admin.train(20)
        first = next(stream)
        admin.pause()
        rest = list(stream)
        status = admin.status()

    done = [first] + [p for p in rest if p.finished]
    assert first.round == start + 1
    assert len(done) <= 2 and "paused" in rest[-1].message
    assert status.paused and not status.training
    head = net.entry.ledger.head
    assert head is not None and head.round == start + len(done)


def test_an_edge_that_dies_mid_run_is_a_failure_not_a_crash(net: Network) -> None:
    net.flaky[3].broken = True
    try:
        progress = net.train(1)
    finally:
        net.flaky[3].broken = False

    assert len(progress) == 1 and progress[0].participants == 3 and progress[0].failures == 1
    head = net.entry.ledger.head
    assert head is not None
    _, records = net.entry.ledger.get_block(head.height)
    assert len(records) == 3


def test_a_selected_edge_that_no_super_node_has_is_reported_as_a_failure(net: Network) -> None:
    ghost = NodeKey.from_seed(b"ghost").node_id
    coordinator = net.entry.coordinator
    assert coordinator is not None
    listed = coordinator.all_edges
    coordinator.all_edges = lambda peers: listed(peers) + [EdgeRef(ghost, "127.0.0.1:1", 9)]  # type: ignore
    try:
        progress = net.train(1)
    finally:
        coordinator.all_edges = listed  # type: ignore[method-assign]

    assert len(progress) == 1 and progress[0].participants == 4 and progress[0].failures == 1


def test_a_peer_that_dies_mid_run_is_a_failure_and_its_edges_are_not_trained(tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=3, edges=3)
    try:
        network.train(1)
        dead = network.sns[2]
        dead.server.stop(None).wait()   # the process is gone: no answer, no co-signature, no commit
        progress = network.train(1)
    finally:
        network.close()

    # 2 of 3 super nodes still make a majority; the dead one's edge is a failure of the round.
    assert len(progress) == 1 and progress[0].finished
    assert progress[0].participants == 2 and progress[0].failures >= 1


def test_fraction_selects_clients_across_the_whole_network_as_the_simulator_does(tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=2, edges=4, fraction=0.25)
    try:
        progress = network.train(3)
        # block 1 admitted the second super node to the validator set; rounds 1-3 are blocks 2-4
        trainers = [[r.record.trainer_id for r in network.entry.ledger.get_block(h)[1]] for h in (2, 3, 4)]
    finally:
        network.close()
    share = {en.key.node_id: i for i, en in enumerate(network.ens)}
    expected = [FedAvg(fraction=0.25, seed=0).select(rnd, ["0", "1", "2", "3"]) for rnd in (1, 2, 3)]

    # One client of four per round over both super nodes (selection per SN would give one per SN: two).
    assert [p.participants for p in progress] == [1, 1, 1]
    assert [[str(share[t]) for t in ts] for ts in trainers] == expected


def test_an_entry_restarted_on_its_data_directory_resumes_from_its_head(tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=2)
    try:
        network.train(1)
        before = network.entry.ledger.head
        port = network.entry.port
        network.entry.stop(None)
        network.entry.ledger.close()

        network.sns[0] = network.make_sn("entry", entry=None, listen=f"127.0.0.1:{port}")
        assert network.entry.ledger.head == before
        assert wait_until(lambda: len(network.entry.edges) == 2, timeout=15.0), "edges did not re-join"
        progress = network.train(1)
        network.entry.ledger.flush()
        block, _ = network.entry.ledger.get_block(2)
    finally:
        network.close()

    assert before is not None
    assert [p.round for p in progress] == [2] and progress[0].participants == 2
    assert block.header.prev_hash == before.hash and block.header.base_model_hash == before.model_hash


def test_fedper_over_the_network_shares_base_layers_only(tmp_path: Path) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=4, algo="fedper")
    try:
        progress = network.train(2)
        with network.admin() as admin:
            report = admin.evaluate()
        stored = network.entry.ledger.load_weights(2)
        personal = network.flaky[0].inner.personal_keys
    finally:
        network.close()

    assert personal and not set(personal) & set(stored)            # personal layers never reach the ledger
    assert all(0.0 < p.metrics["personal_accuracy_mean"] <= 1.0 for p in progress)
    assert "accuracy" not in progress[-1].metrics                   # no global model under FedPer
    assert report.samples == 0 and len(report.edges) == 4
    assert all(not e.error and e.samples > 0 and 0.0 < e.accuracy <= 1.0 for e in report.edges)
    assert report.edge_accuracy_min <= report.edge_accuracy_mean <= report.edge_accuracy_max
