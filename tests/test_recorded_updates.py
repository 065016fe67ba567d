"""Recorded updates (--record-updates): built into a block, stored on both backends, verified, tamper-evident,
synced to a peer, and carried over the wire; forwarded updates inside a partial; the round plan's rule."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from chain.block import Cosignature, SignedRecord, UpdateRecord
from chain.keys import NodeKey
from chain.tensors import encode_weights, model_hash
from chain.updates import DROPPED, REFUSED, UPDATES_ROOT, USED, RecordedUpdate, updates_root
from chain.verify import Head, VerificationError, VerifiedBlock, verify_block, verify_chain
from node.engine import sync
from node.engine.errors import BadRequestError
from node.engine.types import Announcement, BlockData, ChainHead, Partial, Peer, Plan, Update
from node.ledger import Ledger
from node.rpc import serde
from node.rpc.transport import blob_chunks
from proto.fledger_pb2 import BlockPart as BlockPartMsg
from storage.store import LedgerStore, StoreError
from tests.conftest import raw_connection

PROPOSER = NodeKey.from_seed(b"recorded-proposer")
TRAINERS = [NodeKey.from_seed(f"recorded-trainer-{i}".encode()) for i in range(3)]
STATUS_AND_REASON = [(USED, ""), (DROPPED, "multi-krum did not select it"), (REFUSED, "norm 12.5 is over 5")]
CHUNK_BYTES = 128   # each update's blob (353 bytes) then spans 3 chunks
PARAMS = {"lr": "0.05", "local_epochs": 1, "batch_size": 32}


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"layer.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "layer.bias": rng.standard_normal(8).astype(np.float32)}


def signed(key: NodeKey, round_: int, base: str, weights: dict[str, np.ndarray], samples: int = 100) -> SignedRecord:
    record = UpdateRecord(round=round_, trainer_id=key.node_id, trainer_key=key.public_hex, base_model_hash=base,
                          update_hash=model_hash(weights), samples=samples, metrics={"loss_micro": 1000})
    return SignedRecord.create(record, key)


def recorded(round_: int, base: str) -> tuple[RecordedUpdate, ...]:
    """Three real updates of ``round_`` from ``base``: one used, one dropped, one refused."""
    out = []
    for i, (key, (status, reason)) in enumerate(zip(TRAINERS, STATUS_AND_REASON, strict=True)):
        weights = model(100 + i)
        out.append(RecordedUpdate(signed(key, round_, base, weights), status, reason, encode_weights(weights)))
    return tuple(out)


def genesis(ledger: Ledger) -> VerifiedBlock:
    built = ledger.build(round=0, algorithm="fedavg", params=PARAMS, weights=model(0), records=[], metrics={},
                         timestamp_ms=0)
    ledger.accept(built).result()
    return built


def round_one(ledger: Ledger, params: dict[str, object] | None = None,
              updates: tuple[RecordedUpdate, ...] | None = None) -> VerifiedBlock:
    """Block 1 built with three recorded updates (or ``updates``; the first is also the block's record), not yet
    accepted."""
    head = ledger.head
    assert head is not None
    updates = updates if updates is not None else recorded(1, head.model_hash)
    return ledger.build(round=1, algorithm="fedavg", params=params if params is not None else PARAMS,
                        weights=model(1), records=[updates[0].record], metrics={}, timestamp_ms=1000,
                        updates=updates)


def cosigned(built: VerifiedBlock) -> VerifiedBlock:
    return built.cosigned([Cosignature.create(built.header.height, built.block.hash, PROPOSER)])


@pytest.fixture
def ledger(backend: str) -> Iterator[Ledger]:
    """A ledger on a fresh database of each backend holding genesis and block 1 with three recorded updates."""
    node = Ledger(LedgerStore(backend, chunk_bytes=CHUNK_BYTES), PROPOSER)
    try:
        genesis(node)
        node.accept(cosigned(round_one(node))).result()
        yield node
    finally:
        node.close()


@pytest.fixture
def proposer(tmp_path: Path) -> Iterator[Ledger]:
    """A SQLite ledger holding genesis only."""
    node = Ledger(LedgerStore(f"sqlite:///{tmp_path}/proposer.db"), PROPOSER)
    try:
        genesis(node)
        yield node
    finally:
        node.close()


@pytest.fixture
def proposal(proposer: Ledger) -> tuple[VerifiedBlock, Head]:
    """Block 1 with three recorded updates, built (not accepted), and the genesis head it extends."""
    assert proposer.head is not None
    return round_one(proposer), proposer.head


# ---- building, storing, verifying ----------------------------------------------------------------------------


def test_build_commits_to_the_updates_without_changing_the_callers_params(proposer: Ledger) -> None:
    params: dict[str, object] = dict(PARAMS)

    built = round_one(proposer, params)

    assert built.header.params[UPDATES_ROOT] == updates_root(built.updates)
    assert len(built.updates) == 3
    assert params == PARAMS


def test_stored_updates_read_back_equal(ledger: Ledger) -> None:
    expected = recorded(1, model_hash(model(0)))   # Ed25519 signatures are deterministic: the same updates

    assert ledger.recorded_updates(1) == list(expected)
    assert ledger.recorded_updates(0) == []


def test_stored_blocks_carry_their_updates(ledger: Ledger) -> None:
    blocks = list(ledger.blocks(0))

    assert [b.updates for b in blocks] == [(), recorded(1, model_hash(model(0)))]


def test_chain_with_recorded_updates_verifies(ledger: Ledger) -> None:
    report = verify_chain(ledger.store)

    assert (report.head_height, report.blocks) == (1, 2)


def test_iter_blocks_lists_the_updates_without_their_weights(ledger: Ledger) -> None:
    stored = list(ledger.store.iter_blocks())

    assert [len(b.updates) for b in stored] == [0, 3]
    assert [u.position for u in stored[1].updates] == [0, 1, 2]
    assert [u.status for u in stored[1].updates] == [USED, DROPPED, REFUSED]


def test_changed_stored_reason_fails_verify_chain_at_its_height(ledger: Ledger) -> None:
    ledger.flush()
    with raw_connection(ledger.store.url) as conn:
        conn.execute(text("UPDATE recorded_updates SET reason = 'looked fine' WHERE height = 1 AND position = 1"))

    with pytest.raises(VerificationError) as caught:
        verify_chain(ledger.store)

    assert (caught.value.height, caught.value.check) == (1, "updates")


def test_deleted_stored_update_fails_verify_chain(ledger: Ledger) -> None:
    ledger.flush()
    with raw_connection(ledger.store.url) as conn:
        conn.execute(text("DELETE FROM recorded_update_chunks WHERE height = 1 AND position = 2"))
        conn.execute(text("DELETE FROM recorded_updates WHERE height = 1 AND position = 2"))

    with pytest.raises(VerificationError) as caught:
        verify_chain(ledger.store)

    assert (caught.value.height, caught.value.check) == (1, "updates")


def test_changed_update_chunk_is_a_store_error_naming_height_and_position(ledger: Ledger) -> None:
    ledger.flush()
    with raw_connection(ledger.store.url) as conn:
        conn.execute(text("UPDATE recorded_update_chunks SET data = :d WHERE height = 1 AND position = 2 "
                          "AND seq = 1"), {"d": b"\x00" * CHUNK_BYTES})

    with pytest.raises(StoreError, match="height 1: recorded update 2: weight chunk 1 does not match its digest"):
        ledger.recorded_updates(1)


def test_missing_update_chunk_is_a_store_error(ledger: Ledger) -> None:
    ledger.flush()
    with raw_connection(ledger.store.url) as conn:
        conn.execute(text("DELETE FROM recorded_update_chunks WHERE height = 1 AND position = 0 AND seq = 1"))

    with pytest.raises(StoreError, match="recorded update 0: weight chunks are not 0..n-1"):
        ledger.recorded_updates(1)


def test_reset_drops_the_recorded_updates(ledger: Ledger) -> None:
    ledger.flush()
    ledger.store.reset()

    assert ledger.store.recorded_updates(1) == []


def test_probe_covers_the_recorded_update_tables(ledger: Ledger) -> None:
    ledger.flush()
    with raw_connection(ledger.store.url) as conn:
        conn.execute(text("DROP TABLE recorded_update_chunks"))

    with pytest.raises(DBAPIError, match="recorded_update_chunks"):
        ledger.store.probe()


def test_verify_block_keeps_the_updates(proposal: tuple[VerifiedBlock, Head]) -> None:
    built, prev = proposal

    verified = verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=built.updates)

    assert verified.updates == built.updates


def test_verify_block_refuses_an_update_whose_weights_are_not_its_records(
        proposal: tuple[VerifiedBlock, Head]) -> None:
    built, prev = proposal
    updates = list(built.updates)
    updates[1] = dataclasses.replace(updates[1], blob=encode_weights(model(999)))

    with pytest.raises(VerificationError, match="update_hash") as caught:
        verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=updates)

    assert caught.value.check == "updates"


def test_verify_block_refuses_a_list_with_one_update_removed(proposal: tuple[VerifiedBlock, Head]) -> None:
    built, prev = proposal

    with pytest.raises(VerificationError, match="root of 2 recorded updates") as caught:
        verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=built.updates[:2])

    assert caught.value.check == "updates"


def test_verify_block_refuses_updates_on_a_block_that_commits_to_none(proposer: Ledger) -> None:
    prev = proposer.head
    assert prev is not None
    built = proposer.build(round=1, algorithm="fedavg", params=PARAMS, weights=model(1), records=[], metrics={},
                           timestamp_ms=1000)

    with pytest.raises(VerificationError, match="commits to none"):
        verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=recorded(1, prev.model_hash))


def test_verify_block_refuses_a_committed_update_with_a_forged_signature(proposer: Ledger) -> None:
    prev = proposer.head
    assert prev is not None
    updates = recorded(1, prev.model_hash)
    forged = dataclasses.replace(updates[1], record=SignedRecord(updates[1].record.record_bytes, bytes(64)))
    built = round_one(proposer, updates=(updates[0], forged, updates[2]))

    with pytest.raises(VerificationError, match="recorded update 1: bad signature"):
        verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=built.updates)


def test_verify_block_refuses_two_updates_of_one_trainer(proposer: Ledger) -> None:
    prev = proposer.head
    assert prev is not None
    updates = recorded(1, prev.model_hash)
    again = RecordedUpdate(signed(TRAINERS[0], 1, prev.model_hash, model(7)), DROPPED, "", encode_weights(model(7)))
    built = round_one(proposer, updates=(updates[0], again))

    with pytest.raises(VerificationError, match="two recorded updates"):
        verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=built.updates)


def test_verify_block_refuses_an_update_of_another_round(proposer: Ledger) -> None:
    prev = proposer.head
    assert prev is not None
    updates = recorded(1, prev.model_hash)
    stale = RecordedUpdate(signed(TRAINERS[1], 0, prev.model_hash, model(7)), REFUSED, "stale",
                           encode_weights(model(7)))
    built = round_one(proposer, updates=(updates[0], stale))

    with pytest.raises(VerificationError, match="another round or base model"):
        verify_block(built.block, built.records, built.weights_blob, prev=prev, updates=built.updates)


# ---- syncing and the wire ----------------------------------------------------------------------------------------


class WirePeer:
    """A peer serving a ledger's blocks through the block stream's serde, in-process (what GetBlocks sends)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.node_id = ledger.key.node_id

    def head(self) -> ChainHead | None:
        head = self.ledger.head
        return ChainHead(head.height, head.hash, head.model_hash) if head is not None else None

    def blocks(self, start: int, end: int) -> Iterator[BlockData]:
        parts = (part for v in self.ledger.blocks(start, end) for part in serde.block_parts(BlockData.of(v)))
        return serde.read_blocks(parts)


def test_a_syncing_ledger_stores_the_recorded_updates(ledger: Ledger, tmp_path: Path) -> None:
    follower = Ledger(LedgerStore(f"sqlite:///{tmp_path}/follower.db"), NodeKey.from_seed(b"follower"))
    try:
        added = sync.sync_from(follower, cast(Peer, WirePeer(ledger)))

        assert added == 2
        assert follower.recorded_updates(1) == ledger.recorded_updates(1)
        assert verify_chain(follower.store).head_hash == follower.head.hash == ledger.head.hash
    finally:
        follower.close()


def test_block_stream_round_trip_keeps_the_updates(proposal: tuple[VerifiedBlock, Head]) -> None:
    data = BlockData.of(cosigned(proposal[0]))

    (back,) = serde.read_blocks(serde.block_parts(data))

    assert back == data
    assert len(back.updates) == 3


def test_block_stream_with_weights_of_another_update_is_bad_request(proposal: tuple[VerifiedBlock, Head]) -> None:
    data = BlockData.of(proposal[0])
    parts = list(serde.block_parts(dataclasses.replace(data, updates=data.updates[:1])))
    other = data.updates[1]
    foreign = [BlockPartMsg(weights=c) for c in blob_chunks(other.blob, other.record.record.update_hash)]

    with pytest.raises(BadRequestError, match="not the update its record names"):
        list(serde.read_blocks([*parts[:-1], *foreign]))   # update 0's head, then update 1's weights


def test_block_stream_with_an_unknown_status_is_bad_request(proposal: tuple[VerifiedBlock, Head]) -> None:
    data = BlockData.of(proposal[0])
    parts = list(serde.block_parts(data))
    next(p for p in parts if p.WhichOneof("part") == "recorded").recorded.status = "ignored"

    with pytest.raises(BadRequestError, match="status must be one of"):
        list(serde.read_blocks(parts))


# ---- forwarded updates in a partial ------------------------------------------------------------------------------

BASE = "ab" * 32


def forwarding_partial() -> Partial:
    updates = [Update(signed(key, 4, BASE, model(200 + i), samples=10 + i), model(200 + i))
               for i, key in enumerate(TRAINERS)]
    return Partial(sn_id=PROPOSER.node_id, round=4, samples=33, weights=None, records=[u.record for u in updates],
                   updates=updates)


def test_partial_round_trip_keeps_forwarded_updates() -> None:
    partial = forwarding_partial()

    back = serde.read_partial(serde.partial_parts(partial))

    assert back.weights is None
    assert [u.record for u in back.updates] == [u.record for u in partial.updates]
    for got, sent in zip(back.updates, partial.updates, strict=True):
        assert got.weights.keys() == sent.weights.keys()
        assert all(np.array_equal(got.weights[k], sent.weights[k]) for k in sent.weights)


def test_partial_with_altered_forwarded_weights_is_bad_request() -> None:
    partial = forwarding_partial()
    altered = {k: v + 1 for k, v in partial.updates[1].weights.items()}
    partial.updates[1] = Update(partial.updates[1].record, altered)

    with pytest.raises(BadRequestError, match=f"update of edge {TRAINERS[1].node_id} does not match its signed"):
        serde.read_partial(serde.partial_parts(partial))


def test_partial_with_a_forwarded_update_without_weights_is_bad_request() -> None:
    parts = list(serde.partial_parts(forwarding_partial()))
    last_head = max(i for i, p in enumerate(parts) if p.WhichOneof("part") == "update")

    with pytest.raises(BadRequestError, match="came without its weights"):
        serde.read_partial(parts[:last_head + 1])


def test_partial_with_a_forwarded_update_of_a_forged_record_is_bad_request() -> None:
    parts = list(serde.partial_parts(forwarding_partial()))
    forwarded = next(p for p in parts if p.WhichOneof("part") == "update")
    forwarded.update.record.signature = bytes(64)

    with pytest.raises(BadRequestError, match="bad signature"):
        serde.read_partial(parts)


# ---- the round plan ------------------------------------------------------------------------------------------------


def announcement(aggregate: str = "fedavg", record_updates: bool = False) -> Announcement:
    return Announcement(round=4, base_height=3, base_model_hash=BASE, proposer_id=PROPOSER.node_id,
                        participants=(TRAINERS[0].node_id,),
                        plan=Plan("fedavg", 0.05, 1, 32, 0.9, 7, aggregate, record_updates))


@pytest.mark.parametrize(("aggregate", "record_updates"), [("fedavg", False), ("median", True),
                                                           ("clip:norm=5+multi-krum:f=1", False)])
def test_announcement_round_trip_keeps_the_rule_and_recording(aggregate: str, record_updates: bool) -> None:
    ann = announcement(aggregate, record_updates)

    back = serde.announcement_from_msg(serde.announcement_to_msg(ann))

    assert back == ann
    assert back.plan.forwards == (aggregate != "fedavg" or record_updates)


def test_announcement_without_a_rule_means_fedavg() -> None:
    msg = serde.announcement_to_msg(announcement())
    msg.plan.aggregate = ""

    assert serde.announcement_from_msg(msg).plan.aggregate == "fedavg"


def test_announcement_with_a_bad_rule_is_bad_request() -> None:
    msg = serde.announcement_to_msg(announcement())
    msg.plan.aggregate = "majority-vote"

    with pytest.raises(BadRequestError, match="bad aggregation rule in the round plan"):
        serde.announcement_from_msg(msg)
