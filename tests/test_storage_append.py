"""verify_block then LedgerStore.append on both backends: good blocks round-trip; bad blocks are refused by
verify_block (naming the check) and blocks that do not extend the head by append, and neither leaves rows behind."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sqlalchemy import text

from chain.block import BlockHeader, Cosignature, SignedBlock, SignedRecord, build_header, records_root
from chain.encoding import canonical_bytes
from chain.keys import NodeKey
from chain.tensors import encode_weights, model_hash
from chain.verify import Head, VerificationError, VerifiedBlock, verify_block
from conftest import LEDGER_TABLES, build_chain, global_weights, raw_connection, signed_records, trainer_keys
from node.ledger import KEY_FILE
from storage.store import LedgerStore, NotExtendingHead, StoreError

SHAPE = (16, 8)


@dataclasses.dataclass
class Next:
    """A two-block chain in a store, and a valid third block ready to append (or spoil)."""

    store: LedgerStore
    key: NodeKey
    header: BlockHeader
    records: list[SignedRecord]
    weights: dict[str, np.ndarray]

    def block(self, **changes) -> SignedBlock:
        return SignedBlock.create(dataclasses.replace(self.header, **changes), self.key)

    def signed_dict(self, header_dict: dict) -> SignedBlock:
        data = canonical_bytes(header_dict)
        return SignedBlock(data, self.key.sign(data))

    @property
    def blob(self) -> bytes:
        return encode_weights(self.weights)

    def verify(self, block: SignedBlock, records, blob: bytes, cosignatures=(), **kwargs) -> VerifiedBlock:
        """verify_block against the stored head, with this chain's authority (the genesis proposer)."""
        return verify_block(block, records, blob, cosignatures, prev=self.store.head(),
                            authorities={self.key.public_hex}, **kwargs)

    def add(self, block: SignedBlock, records, blob: bytes, cosignatures=(), **kwargs) -> None:
        """What a node does with a block from a peer: verify it, then store it."""
        self.store.append(self.verify(block, records, blob, cosignatures), **kwargs)


@pytest.fixture
def nxt(backend, tmp_path):
    data_dir, _checkpoint, heads = build_chain(backend, 2, trainers=3, tensor_shape=SHAPE, data_dir=tmp_path / "n")
    key = NodeKey.load_or_create(data_dir / KEY_FILE)
    store = LedgerStore(backend, chunk_bytes=512)
    prev_block, _ = store.get_block(heads[-1].height)
    weights = global_weights(2, SHAPE)
    records = signed_records(2, heads[-1].model_hash, trainer_keys(3))
    header = build_header(prev=prev_block.header, prev_hash=prev_block.hash, timestamp_ms=1_700_000_002_000,
                          round=2, algorithm="fedavg", params={"lr": "0.05"}, model_hash=model_hash(weights),
                          records=records, metrics={"accuracy_bp": 7000}, proposer=key)
    yield Next(store, key, header, records, weights)
    store.close()


def row_counts(url: str) -> dict[str, int]:
    with raw_connection(url) as conn:
        return {t: conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one() for t in LEDGER_TABLES}


def assert_refused_and_nothing_written(nxt: Next, error: type[Exception], append, check: str | None = None) -> None:
    before, head_before = row_counts(nxt.store.url), nxt.store.head()
    with pytest.raises(error) as caught:
        append()
    if check is not None:
        assert caught.value.check == check, str(caught.value)
    assert (row_counts(nxt.store.url), nxt.store.head()) == (before, head_before)


# ---- good blocks ------------------------------------------------------------------------------------------------

def test_appended_block_reads_back_byte_identical(nxt):
    block = nxt.block()
    nxt.add(block, nxt.records, nxt.blob)
    got_block, got_records = nxt.store.get_block(2)
    assert (got_block, got_records) == (block, nxt.records)


def test_appended_weights_blob_loads_back_identical(nxt):
    nxt.add(nxt.block(), nxt.records, nxt.blob)
    assert nxt.store.load_weights_blob(2) == nxt.blob


def test_appended_weights_load_back_decoded_with_the_model_hash(nxt):
    nxt.add(nxt.block(), nxt.records, nxt.blob)
    assert model_hash(nxt.store.load_weights(2)) == nxt.header.model_hash


def test_appended_block_becomes_the_head(nxt):
    block = nxt.block()
    nxt.add(block, nxt.records, nxt.blob)
    assert nxt.store.head() == Head(2, block.hash, nxt.header.model_hash, 2)


def test_appended_block_reads_back_as_the_verified_block(nxt):
    block = nxt.block()
    cosig = Cosignature.create(2, block.hash, NodeKey.from_seed(b"cosigner"))
    verified = nxt.verify(block, nxt.records, nxt.blob, [cosig])
    nxt.store.append(verified)
    assert list(nxt.store.blocks(2, 2)) == [verified]


def test_cosignatures_given_as_a_generator_are_all_stored(nxt):
    block = nxt.block()
    signers = [NodeKey.from_seed(f"cosigner-{i}".encode()) for i in range(2)]
    nxt.add(block, nxt.records, nxt.blob, cosignatures=(Cosignature.create(2, block.hash, k) for k in signers))
    assert sorted(c.signer_key for c in nxt.store.cosignatures(2)) == sorted(k.public_hex for k in signers)


def test_cosigned_adds_valid_cosignatures_to_a_verified_block(nxt):
    verified = nxt.verify(nxt.block(), nxt.records, nxt.blob)
    cosig = Cosignature.create(2, verified.block.hash, NodeKey.from_seed(b"cosigner"))
    assert verified.cosigned([cosig]).cosignatures == (cosig,)


# ---- bad blocks: verify_block refuses them, nothing written --------------------------------------------------------

def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0xFF
    return bytes(out)


def test_corrupt_weight_data_is_refused(nxt):
    assert_refused_and_nothing_written(nxt, VerificationError,
                                       lambda: nxt.add(nxt.block(), nxt.records, _flip(nxt.blob, -5)), "model")


def test_corrupt_weight_blob_header_is_refused(nxt):
    assert_refused_and_nothing_written(nxt, VerificationError,
                                       lambda: nxt.add(nxt.block(), nxt.records, _flip(nxt.blob, 3)), "model")


def test_weights_not_hashing_to_model_hash_are_refused(nxt):
    other = encode_weights(global_weights(99, SHAPE))
    assert_refused_and_nothing_written(nxt, VerificationError,
                                       lambda: nxt.add(nxt.block(), nxt.records, other), "model")


def test_weights_are_not_decoded_when_the_model_check_is_off(nxt):
    verified = nxt.verify(nxt.block(), nxt.records, b"not a weight blob", check_model=False)
    assert verified.weights_blob == b"not a weight blob"


def test_header_missing_a_field_is_refused(nxt):
    header = {k: v for k, v in nxt.header.to_dict().items() if k != "metrics"}
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(nxt.signed_dict(header), nxt.records, nxt.blob), "header")


def test_header_with_an_extra_field_is_refused(nxt):
    header = {**nxt.header.to_dict(), "bonus": 1}
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(nxt.signed_dict(header), nxt.records, nxt.blob), "header")


@pytest.mark.parametrize("length", [0, 63, 65])
def test_block_signature_of_wrong_length_is_refused(nxt, length):
    block = nxt.block()
    bad = SignedBlock(block.header_bytes, (block.signature * 2)[:length])
    assert_refused_and_nothing_written(nxt, VerificationError, lambda: nxt.add(bad, nxt.records, nxt.blob),
                                       "signature")


def test_bad_block_signature_is_refused(nxt):
    block = nxt.block()
    bad = SignedBlock(block.header_bytes, _flip(block.signature, 0))
    assert_refused_and_nothing_written(nxt, VerificationError, lambda: nxt.add(bad, nxt.records, nxt.blob),
                                       "signature")


def test_block_signed_by_a_stranger_is_refused(nxt):
    stranger = NodeKey.from_seed(b"stranger")
    header = dataclasses.replace(nxt.header, proposer_id=stranger.node_id, proposer_key=stranger.public_hex)
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(SignedBlock.create(header, stranger), nxt.records, nxt.blob),
        "signature")


def test_block_at_the_wrong_height_is_refused(nxt):
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(nxt.block(height=3), nxt.records, nxt.blob), "height")


def test_block_with_the_wrong_prev_hash_is_refused(nxt):
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(nxt.block(prev_hash="ab" * 32), nxt.records, nxt.blob), "link")


def test_block_with_the_wrong_base_model_is_refused(nxt):
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(nxt.block(base_model_hash="ab" * 32), nxt.records, nxt.blob),
        "link")


def test_head_block_verified_again_is_refused(nxt):
    head_block, head_records = nxt.store.get_block(1)
    blob = nxt.store.load_weights_blob(1)
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(head_block, head_records, blob), "height")


def test_record_with_a_bad_signature_is_refused(nxt):
    records = list(nxt.records)
    records[1] = SignedRecord(records[1].record_bytes, _flip(records[1].signature, 5))
    block = nxt.block(records_root=records_root(records))
    assert_refused_and_nothing_written(nxt, VerificationError, lambda: nxt.add(block, records, nxt.blob),
                                       "record-signature")


def test_records_not_matching_the_records_root_are_refused(nxt):
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(nxt.block(), nxt.records[:2], nxt.blob), "merkle")


def test_invalid_cosignature_is_refused(nxt):
    block = nxt.block()
    wrong = Cosignature.create(2, "00" * 32, NodeKey.from_seed(b"cosigner"))
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(block, nxt.records, nxt.blob, cosignatures=[wrong]), "cosignature")


def test_duplicate_cosigner_is_refused(nxt):
    block = nxt.block()
    cosig = Cosignature.create(2, block.hash, NodeKey.from_seed(b"cosigner"))
    assert_refused_and_nothing_written(
        nxt, VerificationError, lambda: nxt.add(block, nxt.records, nxt.blob, cosignatures=[cosig, cosig]),
        "cosignature")


def test_cosigned_refuses_an_invalid_cosignature(nxt):
    verified = nxt.verify(nxt.block(), nxt.records, nxt.blob)
    wrong = Cosignature.create(2, "00" * 32, NodeKey.from_seed(b"cosigner"))
    with pytest.raises(VerificationError) as caught:
        verified.cosigned([wrong])
    assert (caught.value.height, caught.value.check) == (2, "cosignature")


# ---- append: only the next block, whole or not at all ------------------------------------------------------------

def unchecked(block: SignedBlock, records, blob: bytes) -> VerifiedBlock:
    """A block wrapped as verified without verify_block: append trusts it, so only its head check can refuse it."""
    return VerifiedBlock(block, tuple(records), blob)


def test_block_at_the_wrong_height_does_not_extend_the_head(nxt):
    assert_refused_and_nothing_written(
        nxt, NotExtendingHead, lambda: nxt.store.append(unchecked(nxt.block(height=3), nxt.records, nxt.blob)))


def test_block_with_the_wrong_prev_hash_does_not_extend_the_head(nxt):
    assert_refused_and_nothing_written(
        nxt, NotExtendingHead,
        lambda: nxt.store.append(unchecked(nxt.block(prev_hash="ab" * 32), nxt.records, nxt.blob)))


def test_head_block_appended_again_does_not_extend_the_head(nxt):
    (head,) = nxt.store.blocks(1, 1)
    assert_refused_and_nothing_written(nxt, NotExtendingHead, lambda: nxt.store.append(head))


def test_write_failing_after_the_block_rows_were_inserted_leaves_no_partial_rows(nxt):
    # The NULL client state passes every check and only fails on the final INSERT, after the block, record and
    # chunk rows went to the database: the transaction must take them all back.
    assert_refused_and_nothing_written(
        nxt, StoreError, lambda: nxt.add(nxt.block(), nxt.records, nxt.blob, client_state={"c0": None}))


# ---- a big model ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_100mb_model_stores_and_loads_with_the_same_hash(backend, tmp_path, capsys):
    if backend.startswith("mysql"):
        with raw_connection(backend) as conn:
            packet = conn.execute(text("SELECT @@max_allowed_packet")).scalar_one()
        with capsys.disabled():
            print(f"\n[mysql] max_allowed_packet = {packet} bytes")
    weights = {"big": np.random.default_rng(0).standard_normal(25_000_000, dtype=np.float32)}
    expected = model_hash(weights)
    key = NodeKey.from_seed(b"big")
    header = build_header(prev=None, prev_hash=None, timestamp_ms=0, round=0, algorithm="fedavg", params={},
                          model_hash=expected, records=[], metrics={}, proposer=key)
    store = LedgerStore(backend)
    try:
        store.append(verify_block(SignedBlock.create(header, key), [], encode_weights(weights), prev=None))
        del weights
        assert model_hash(store.load_weights(0)) == expected
    finally:
        store.close()
