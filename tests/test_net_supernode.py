"""Super nodes on loopback with real ledgers: registry over gRPC, edge join, co-sign/commit, late-joiner sync."""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import text

from chain.block import Cosignature, SignedBlock, SignedRecord, UpdateRecord, build_header
from chain.keys import NodeKey
from chain.tensors import encode_weights, model_hash
from chain.verify import VerifiedBlock, verify_chain
from config import Config
from conftest import free_port, raw_connection, wait_until
from node.engine.consensus import finalize
from node.engine.edge import EdgeCore
from node.engine.errors import NoMajorityError
from node.engine.types import BlockData
from node.ledger import Ledger
from node.process.edge import EdgeNode
from node.process.supernode import SuperNode
from node.rpc import serde, transport
from node.rpc.clients import GrpcPeer
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import CommitRequest as CommitRequestMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import Height as HeightMsg
from proto.fledger_pb2 import ListRequest as ListRequestMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg

WEIGHTS = {"w": np.arange(6, dtype=np.float32)}
BEAT = 0.2
MISSED_BEATS = 25   # 5 s: a busy test process must not make members flap


def make_sn(tmp_path: Path, name: str, entry: str | None = None, listen: str = "127.0.0.1:0") -> SuperNode:
    key = NodeKey.from_seed(name.encode())
    ledger = Ledger.open(tmp_path / name, key=key)
    sn = SuperNode(ledger, listen, Config(data_root=str(tmp_path / name)), entry=entry, heartbeat_interval=BEAT,
                   missed_beats=MISSED_BEATS, genesis=False)
    sn.start()
    return sn


def stop(*sns: SuperNode | None) -> None:
    for sn in sns:
        if sn is not None:
            sn.stop(None)
            sn.ledger.close()


@pytest.fixture
def entry(tmp_path: Path) -> Iterator[SuperNode]:
    sn = make_sn(tmp_path, "entry")
    yield sn
    stop(sn)


def genesis(sn: SuperNode, validators: Sequence[str] = ()) -> SignedBlock:
    """The genesis block; the super nodes named ``validators`` (key seeds, as make_sn names them) are validators
    with ``sn``, otherwise ``sn`` alone is."""
    keys = sorted({sn.key.public_hex, *(NodeKey.from_seed(name.encode()).public_hex for name in validators)})
    params = {"validators": keys} if validators else {}
    verified = sn.ledger.build(round=0, algorithm="fedavg", params=params, weights=WEIGHTS, records=[], metrics={},
                               timestamp_ms=0)
    sn.ledger.accept(verified).result()
    return verified.block


def proposal(sn: SuperNode, weights: dict[str, np.ndarray], records: list[SignedRecord] | None = None) -> VerifiedBlock:
    return sn.ledger.build(round=1, algorithm="fedavg", params={}, weights=weights, records=records or [],
                           metrics={}, timestamp_ms=1)


def parts(block: SignedBlock, weights: dict[str, np.ndarray], sender: str | None = None):  # noqa: ANN201
    """A ProposeBlock stream from ``sender`` (default: the block's proposer) in view 0."""
    return serde.proposal_parts(BlockData(block, (), encode_weights(weights)), 0, sender or _proposer(block))


def _proposer(block: SignedBlock) -> str:
    try:
        return block.header.proposer_id
    except ValueError:
        return "0" * 32


def test_block_is_cosigned_and_committed_by_a_peer_and_synced_by_a_late_joiner(entry: SuperNode,
                                                                              tmp_path: Path) -> None:
    genesis(entry, ["peer"])   # "late" is no validator: it only syncs
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    late = None
    try:
        assert wait_until(lambda: peer.ledger.head is not None), "peer did not sync genesis"
        trainer = NodeKey.from_seed(b"trainer")
        new = {"w": WEIGHTS["w"] + 1}
        record = SignedRecord.create(UpdateRecord(1, trainer.node_id, trainer.public_hex, model_hash(WEIGHTS),
                                                  model_hash(new), 5, {}), trainer)

        final, failures = finalize(entry.ledger, entry.peers(), proposal(entry, new, [record]))
        peer.ledger.flush()
        late = make_sn(tmp_path, "late", entry=entry.address)

        assert failures == [] and len(final.cosignatures) == 2
        assert peer.ledger.head == final.head
        assert wait_until(lambda: late.ledger.head == final.head)
        late.ledger.flush()
        assert model_hash(late.ledger.load_weights(1)) == model_hash(new)
        # The whole chain, co-signatures and models checked.
        assert verify_chain(late.ledger.store, check_models=True).blocks == 2
        assert {c.signer_key for c in late.ledger.store.cosignatures(1)} == {entry.key.public_hex, peer.key.public_hex}
    finally:
        stop(peer, late)


def test_a_block_without_a_majority_of_cosignatures_is_stored_nowhere(entry: SuperNode) -> None:
    genesis(entry, ["dead0", "dead1"])
    head = entry.ledger.head
    dead_peers = [GrpcPeer(NodeKey.from_seed(f"dead{i}".encode()).node_id, f"127.0.0.1:{free_port()}")
                  for i in range(2)]   # nothing listens there

    with pytest.raises(NoMajorityError, match="1 of 3 validators' co-signatures"):
        finalize(entry.ledger, dead_peers, proposal(entry, {"w": WEIGHTS["w"] + 1}))

    entry.ledger.flush()
    assert entry.ledger.head == head
    stored = entry.ledger.store.head()
    assert stored is not None and stored.height == 0
    assert head is not None and entry.ledger.verify_chain().head_hash == head.hash


def test_a_peer_that_fails_to_commit_is_a_failure_of_the_round(entry: SuperNode, tmp_path: Path) -> None:
    genesis(entry, ["peer0", "peer1"])
    peers = [make_sn(tmp_path, f"peer{i}", entry=entry.address) for i in range(2)]
    try:
        assert wait_until(lambda: all(p.ledger.head is not None for p in peers))
        verified = proposal(entry, {"w": WEIGHTS["w"] + 1})

        class CommitLost(GrpcPeer):
            def commit(self, height, block_hash, cosignatures) -> None:  # noqa: ANN001
                dying = next(p for p in peers if p.key.node_id == self.node_id)
                dying.server.stop(None).wait()   # it co-signed, then died before the commit
                super().commit(height, block_hash, cosignatures)

        final, failures = finalize(entry.ledger, [CommitLost(p.key.node_id, p.address) for p in peers], verified)

        # Co-signing stopped at a majority of 3: the entry and the first peer to answer, whose commit then failed.
        assert len(final.cosignatures) == 2
        signer = next(c.signer_key for c in final.cosignatures if c.signer_key != entry.key.public_hex)
        dead = next(p for p in peers if p.key.public_hex == signer)
        assert [node_id for node_id, _ in failures] == [dead.key.node_id]
        assert "commit" in failures[0][1]
        assert entry.ledger.head == final.head and dead.ledger.head != final.head
    finally:
        stop(*peers)


def test_blocks_from_a_key_other_than_the_chains_authority_are_refused(entry: SuperNode, tmp_path: Path) -> None:
    first = genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.head is not None)
        rogue = NodeKey.from_seed(b"rogue")
        new = {"w": WEIGHTS["w"] * 3}
        header = build_header(prev=first.header, prev_hash=first.hash, timestamp_ms=1, round=1, algorithm="fedavg",
                              params={}, model_hash=model_hash(new), records=[], metrics={}, proposer=rogue)
        forged = SignedBlock.create(header, rogue)
        honest = proposal(entry, new).block
        with transport.open_channel(peer.address) as channel:
            stub = fledger_pb2_grpc.SuperNodeStub(channel)
            with pytest.raises(grpc.RpcError) as sent:   # a sender that is no validator moves no one
                stub.ProposeBlock(parts(forged, new), timeout=10)
            with pytest.raises(grpc.RpcError) as proposed:   # a forged block, even from a validator
                stub.ProposeBlock(parts(forged, new, entry.key.node_id), timeout=10)
            stub.ProposeBlock(parts(honest, new), timeout=10)
            peer_only = CommitRequestMsg(height=1, hash=honest.hash, cosignatures=[
                serde.cosig_to_msg(Cosignature.create(1, honest.hash, rogue))])
            with pytest.raises(grpc.RpcError) as committed:
                stub.CommitBlock(peer_only, timeout=10)
            head = stub.GetHead(EmptyMsg(), timeout=5)

        assert sent.value.code() == grpc.StatusCode.PERMISSION_DENIED and "not a validator" in sent.value.details()
        assert proposed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not an authority" in proposed.value.details()
        assert committed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a validator" in committed.value.details()
        assert head.height == 0
    finally:
        stop(peer)


def test_commit_of_a_block_never_proposed_is_not_found(entry: SuperNode, tmp_path: Path) -> None:
    genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.head is not None)
        block = proposal(entry, {"w": WEIGHTS["w"] + 1}).block
        with transport.open_channel(peer.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                fledger_pb2_grpc.SuperNodeStub(channel).CommitBlock(CommitRequestMsg(
                    height=1, hash=block.hash,
                    cosignatures=[serde.cosig_to_msg(Cosignature.create(1, block.hash, entry.key))]), timeout=10)

        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "propose it first" in info.value.details()
    finally:
        stop(peer)


def test_commit_listing_a_cosigner_twice_is_invalid(entry: SuperNode, tmp_path: Path) -> None:
    genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.head is not None)
        new = {"w": WEIGHTS["w"] + 1}
        block = proposal(entry, new).block
        own = serde.cosig_to_msg(Cosignature.create(1, block.hash, entry.key))
        with transport.open_channel(peer.address) as channel:
            stub = fledger_pb2_grpc.SuperNodeStub(channel)
            stub.ProposeBlock(parts(block, new), timeout=10)
            with pytest.raises(grpc.RpcError) as info:
                stub.CommitBlock(CommitRequestMsg(height=1, hash=block.hash, cosignatures=[own, own]), timeout=10)

        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "twice" in info.value.details()
        assert peer.ledger.head is not None and peer.ledger.head.height == 0
    finally:
        stop(peer)


def test_tampered_block_is_refused_with_invalid_argument(entry: SuperNode, tmp_path: Path) -> None:
    genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.head is not None)
        block = proposal(entry, {"w": WEIGHTS["w"] * 2}).block
        with transport.open_channel(peer.address) as channel:
            stub = fledger_pb2_grpc.SuperNodeStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ProposeBlock(parts(block, WEIGHTS), timeout=10)   # the weights are not the block's model
            head = stub.GetHead(EmptyMsg(), timeout=5)

        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model" in info.value.details()
        assert head.height == 0
    finally:
        stop(peer)


def test_block_not_extending_the_head_is_failed_precondition(entry: SuperNode, tmp_path: Path) -> None:
    block = genesis(entry)
    peer = make_sn(tmp_path, "peer", entry=entry.address)
    try:
        assert wait_until(lambda: peer.ledger.head is not None)
        with transport.open_channel(peer.address) as channel:
            with pytest.raises(grpc.RpcError) as info:
                fledger_pb2_grpc.SuperNodeStub(channel).ProposeBlock(parts(block, WEIGHTS), timeout=10)

        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop(peer)


class Idle:
    """A participant that is never asked to train (membership tests)."""

    participant_id = "idle"
    num_train_samples = 0
    personal_keys = ()


def test_edge_node_rejoins_a_super_node_restarted_without_its_membership(entry: SuperNode, tmp_path: Path) -> None:
    key = NodeKey.from_seed(b"en")
    edge = EdgeNode(EdgeCore(Idle(), key), "127.0.0.1:0", entry.address,  # type: ignore[arg-type]
                    heartbeat_interval=BEAT)
    edge.start()
    restarted = None
    try:
        assert wait_until(lambda: [m.node_id for m in entry.edges.members()] == [key.node_id])
        port = entry.port
        entry.stop(None)
        entry.ledger.close()
        restarted = make_sn(tmp_path, "entry", listen=f"127.0.0.1:{port}")   # same node, empty edge table

        assert wait_until(lambda: [m.node_id for m in restarted.edges.members()] == [key.node_id]), \
            "edge did not register again after being forgotten"
    finally:
        edge.stop(None)
        stop(restarted)


def test_registry_refuses_taken_id_and_unknown_heartbeat(entry: SuperNode) -> None:
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


def test_full_super_nodes_are_resource_exhausted_over_grpc(tmp_path: Path) -> None:
    key = NodeKey.from_seed(b"full-entry")
    ledger = Ledger.open(tmp_path / "full", key=key)
    sn = SuperNode(ledger, "127.0.0.1:0", Config(data_root=str(tmp_path / "full")), heartbeat_interval=BEAT,
                   missed_beats=MISSED_BEATS, capacity=1, genesis=False)
    sn.start()
    try:
        first, second = NodeKey.from_seed(b"e1"), NodeKey.from_seed(b"e2")
        with transport.open_channel(sn.address) as channel:
            stub = fledger_pb2_grpc.SuperNodeStub(channel)
            stub.RegisterEdge(NodeInfoMsg(node_id=first.node_id, public_key=first.public_hex,
                                          address="127.0.0.1:1"), timeout=5)
            with pytest.raises(grpc.RpcError) as info:
                stub.RegisterEdge(NodeInfoMsg(node_id=second.node_id, public_key=second.public_hex,
                                              address="127.0.0.1:2"), timeout=5)

        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        stop(sn)


def test_get_model_streams_the_head_model(entry: SuperNode) -> None:
    genesis(entry)
    with transport.open_channel(entry.address) as channel:
        chunks = fledger_pb2_grpc.SuperNodeStub(channel).GetModel(HeightMsg(height=0), timeout=10)

        weights, digest = transport.receive_weights(chunks)

    assert model_hash(weights) == digest == model_hash(WEIGHTS)


def test_a_storage_failure_while_catching_up_does_not_end_the_heartbeat(tmp_path: Path) -> None:
    def sn(name: str, entry: str | None) -> SuperNode:
        ledger = Ledger.open(tmp_path / name, key=NodeKey.from_seed(name.encode()))
        node = SuperNode(ledger, "127.0.0.1:0", Config(data_root=str(tmp_path / name)), entry=entry,
                         heartbeat_interval=BEAT, missed_beats=5, genesis=False)   # silent 1 s: dropped
        return node

    entry = sn("entry", None)
    entry.start()
    genesis(entry)
    broken = sn("broken", entry.address)
    with raw_connection(f"sqlite:///{tmp_path / 'broken' / 'ledger.db'}") as conn:
        conn.execute(text("ALTER TABLE model_chunks RENAME TO model_chunks_gone"))   # every block write fails
    broken.start()
    try:
        assert wait_until(lambda: len(entry.registry) == 2), "the super node did not register"
        time.sleep(15 * BEAT)   # three times the drop timeout after the failed catch-up

        assert broken.ledger.durable_head is None   # the catch-up failed, yet the node still heartbeats:
        assert [m.node_id for m in entry.registry.members()] == sorted([entry.key.node_id, broken.key.node_id])
    finally:
        stop(broken, entry)
