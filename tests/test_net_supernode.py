"""Super nodes on loopback with real ledgers: registry over gRPC, edge join, co-sign/commit, late-joiner sync."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from chain.block import Cosignature, SignedBlock, SignedRecord, UpdateRecord, build_header
from chain.keys import NodeKey
from chain.tensors import encode_weights, model_hash
from chain.verify import verify_chain
from node.rpc import serde
from node.engine import sync
from node.rpc import transport
from node.process.edge import EdgeNode
from node.engine.errors import NoMajorityError
from node.ledger import Ledger
from node.process.supernode import SuperNode, propose_and_commit
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import CommitRequest as CommitRequestMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import Height as HeightMsg
from proto.fledger_pb2 import ListRequest as ListRequestMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg

from conftest import free_port, wait_until

WEIGHTS = {"w": np.arange(6, dtype=np.float32)}



def make_sn(tmp_path: Path, name: str, entry: str | None = None) -> SuperNode:
    key = NodeKey.from_seed(name.encode())
    ledger = Ledger.open(tmp_path / name, key=key)
    sn = SuperNode(key, ledger, "127.0.0.1:0", entry=entry, heartbeat_interval=0.2)
    sn.start()
    return sn


@pytest.fixture
def entry(tmp_path: Path) -> Iterator[SuperNode]:
    sn = make_sn(tmp_path, "entry")
    yield sn
    sn.stop(None)
    sn.ledger.close()


def genesis(sn: SuperNode) -> SignedBlock:
    block, durable = sn.ledger.propose(round=0, algorithm="fedavg", params={}, weights=WEIGHTS, records=[],
                                       metrics={}, timestamp_ms=0)
    durable.result()
    return block


def test_block_is_cosigned_and_committed_by_a_peer_and_synced_by_a_late_joiner(entry, tmp_path) -> None:
    genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    late = None
    try:
        assert wait_until(lambda: peer.ledger.tip is not None), "peer did not sync genesis"
        trainer = NodeKey.from_seed(b"trainer")
        new = {"w": WEIGHTS["w"] + 1}
        record = SignedRecord.create(UpdateRecord(1, trainer.node_id, trainer.public_hex, model_hash(WEIGHTS),
                                                  model_hash(new), 5, {}), trainer)
        block = entry.ledger.build(round=1, algorithm="fedavg", params={}, weights=new, records=[record],
                                   metrics={}, timestamp_ms=1)

        cosigs = propose_and_commit(entry.ledger, entry.peers(), block, [record], encode_weights(new))
        peer.ledger.flush()
        late = make_sn(tmp_path, "late", entry=entry.address)

        assert len(cosigs) == 2
        assert peer.ledger.tip.hash == block.hash
        assert wait_until(lambda: late.ledger.tip is not None and late.ledger.tip.hash == block.hash)
        late.ledger.flush()
        assert model_hash(late.ledger.load_weights(1)) == model_hash(new)
        # The whole chain, co-signatures and models checked (not the late node's own checkpoint, see report).
        assert verify_chain(late.ledger.store, check_models=True).blocks == 2
        assert {c.signer_key for c in late.ledger.store.cosignatures(1)} == {entry.key.public_hex, peer.key.public_hex}
    finally:
        for sn in (peer, late):
            if sn is not None:
                sn.stop(None)
                sn.ledger.close()


def test_a_block_without_a_majority_of_cosignatures_is_stored_nowhere(entry) -> None:
    genesis(entry)
    head = entry.ledger.tip
    new = {"w": WEIGHTS["w"] + 1}
    block = entry.ledger.build(round=1, algorithm="fedavg", params={}, weights=new, records=[], metrics={},
                               timestamp_ms=1)
    dead_peers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]   # nothing listens there

    with pytest.raises(NoMajorityError, match="1 of 3 co-signatures"):
        propose_and_commit(entry.ledger, dead_peers, block, [], encode_weights(new))

    entry.ledger.flush()
    assert entry.ledger.tip == head
    assert entry.ledger.store.head().height == 0
    assert entry.ledger.verify().head_hash == head.hash


def test_blocks_from_a_key_other_than_the_chains_authority_are_refused(entry, tmp_path) -> None:
    first = genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.tip is not None)
        rogue = NodeKey.from_seed(b"rogue")
        new = {"w": WEIGHTS["w"] * 3}
        header = build_header(prev=first.header, prev_hash=first.hash, timestamp_ms=1, round=1, algorithm="fedavg",
                              params={}, model_hash=model_hash(new), records=[], metrics={}, proposer=rogue)
        forged = SignedBlock.create(header, rogue)
        honest = entry.ledger.build(round=1, algorithm="fedavg", params={}, weights=new, records=[], metrics={},
                                    timestamp_ms=1)
        with transport.open_channel(peer.address) as channel:
            stub = fledger_pb2_grpc.SuperNodeStub(channel)
            with pytest.raises(grpc.RpcError) as proposed:
                stub.ProposeBlock(sync.block_parts(forged, [], encode_weights(new), model_hash(new)), timeout=10)
            stub.ProposeBlock(sync.block_parts(honest, [], encode_weights(new), model_hash(new)), timeout=10)
            peer_only = CommitRequestMsg(height=1, hash=honest.hash, cosignatures=[
                serde.cosig_to_msg(Cosignature.create(1, honest.hash, rogue))])
            with pytest.raises(grpc.RpcError) as committed:
                stub.CommitBlock(peer_only, timeout=10)
            head = stub.GetHead(EmptyMsg(), timeout=5)

        assert proposed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an authority" in proposed.value.details()
        assert committed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "proposer's co-signature" in committed.value.details()
        assert head.height == 0
    finally:
        peer.stop(None)
        peer.ledger.close()


def test_tampered_block_is_refused_with_invalid_argument(entry, tmp_path) -> None:
    genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.tip is not None)
        new = {"w": WEIGHTS["w"] * 2}
        block, _ = entry.ledger.propose(round=1, algorithm="fedavg", params={}, weights=new, records=[],
                                        metrics={}, timestamp_ms=1)
        with transport.open_channel(peer.address) as channel:
            stub = fledger_pb2_grpc.SuperNodeStub(channel)
            wrong_model = sync.block_parts(block, [], encode_weights(WEIGHTS), model_hash(WEIGHTS))

            with pytest.raises(grpc.RpcError) as info:
                stub.ProposeBlock(wrong_model, timeout=10)
            head = stub.GetHead(EmptyMsg(), timeout=5)

        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in info.value.details()
        assert head.height == 0
    finally:
        peer.stop(None)
        peer.ledger.close()


def test_block_not_extending_the_head_is_failed_precondition(entry, tmp_path) -> None:
    block = genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.tip is not None)
        with transport.open_channel(peer.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                fledger_pb2_grpc.SuperNodeStub(channel).ProposeBlock(
                    sync.block_parts(block, [], encode_weights(WEIGHTS), model_hash(WEIGHTS)), timeout=10)

        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        peer.stop(None)
        peer.ledger.close()


def test_edge_node_joins_the_assigned_super_node_and_rejoins_when_forgotten(entry) -> None:
    key = NodeKey.from_seed(b"en")
    edge = EdgeNode(key, participant=None, listen="127.0.0.1:0", entry=entry.address, heartbeat_interval=0.2)
    edge.start()
    try:
        assert wait_until(lambda: [m.node_id for m in entry.edges.members()] == [key.node_id])
        entry.edges.remove(key.node_id)

        assert wait_until(lambda: len(entry.edges) == 1), "edge did not re-register after being forgotten"
    finally:
        edge.stop(None)


def test_registry_refuses_taken_id_and_unknown_heartbeat(entry) -> None:
    other = NodeKey.from_seed(b"other")
    with transport.open_channel(entry.address) as channel:
        stub = fledger_pb2_grpc.RegistryStub(channel)
        taken = NodeInfoMsg(node_id=entry.key.node_id, public_key=other.public_hex, address="127.0.0.1:1")

        with pytest.raises(grpc.RpcError) as taken_err:
            stub.RegisterSuperNode(taken, timeout=5)
        with pytest.raises(grpc.RpcError) as unknown_err:
            stub.Heartbeat(HeartbeatRequestMsg(node_id=other.node_id), timeout=5)
        still = stub.ListSuperNodes(ListRequestMsg(), timeout=5)

    assert taken_err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert unknown_err.value.code() == grpc.StatusCode.NOT_FOUND and "register again" in unknown_err.value.details()
    assert [m.info.node_id for m in still.members] == [entry.key.node_id]


def test_get_model_streams_the_head_model(entry) -> None:
    genesis(entry)
    with transport.open_channel(entry.address) as channel:
        chunks = fledger_pb2_grpc.SuperNodeStub(channel).GetModel(HeightMsg(height=0), timeout=10)

        weights, _ = transport.receive_weights(chunks)

    assert model_hash(weights) == model_hash(WEIGHTS)
