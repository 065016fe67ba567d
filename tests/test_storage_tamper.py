"""Tamper detection on both backends: one direct SQL change to a stored chain, and verify_chain names the height.

A 6-block chain is built once per backend (conftest.chain_template); every case starts from a fresh copy and
changes one column of one row of block 3 (or deletes rows), then checks which height and check the verifier blames.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from sqlalchemy import text

from chain.checkpoint import Checkpoint
from chain.keys import NodeKey
from chain.verify import VerificationError, verify_chain
from conftest import raw_connection
from storage.store import LedgerStore, StoreError

MIDDLE = 3


def flip_hex(value: str) -> str:
    return ("1" if value[0] == "0" else "0") + value[1:]


def flip_bit(value: bytes, at: int = -1) -> bytes:
    data = bytearray(value)
    data[at] ^= 0x01
    return bytes(data)


def bump_timestamp(header: bytes) -> bytes:
    """A still-canonical, still-parseable header whose timestamp is one millisecond later."""
    head, _, rest = header.partition(b'"timestamp_ms":')
    digits = rest.split(b",", 1)[0]
    return head + b'"timestamp_ms":' + str(int(digits) + 1).encode() + rest[len(digits):]


@dataclass(frozen=True)
class Change:
    """Set ``column`` of the rows matched by ``where`` to ``new(old value)``."""

    table: str
    column: str
    where: str
    new: Callable

    def apply(self, conn) -> None:
        old = conn.execute(text(f"SELECT {self.column} FROM {self.table} WHERE {self.where}")).scalar_one()
        value = self.new(bytes(old) if isinstance(old, (bytes, memoryview)) else old)
        conn.execute(text(f"UPDATE {self.table} SET {self.column} = :v WHERE {self.where}"), {"v": value})


BLOCK = f"height = {MIDDLE}"
RECORD = f"height = {MIDDLE} AND position = 1"
CHUNK = f"height = {MIDDLE} AND seq = 0"
# The template's extra co-signer (conftest.build_chain), not the proposer, which co-signs each round block too.
COSIG = f"height = {MIDDLE} AND signer_key = '{NodeKey.from_seed(b'cosigner-0-0').public_hex}'"

# (id, change, check the verifier must name); every change is to block MIDDLE, so the height is always MIDDLE.
COLUMN_CASES = [
    ("blocks.height", Change("blocks", "height", BLOCK, lambda v: 1000), "height"),
    ("blocks.hash", Change("blocks", "hash", BLOCK, flip_hex), "hash"),
    ("blocks.prev_hash", Change("blocks", "prev_hash", BLOCK, flip_hex), "index"),
    ("blocks.round", Change("blocks", "round", BLOCK, lambda v: v + 1), "index"),
    ("blocks.timestamp_ms", Change("blocks", "timestamp_ms", BLOCK, lambda v: v + 1), "index"),
    ("blocks.model_hash", Change("blocks", "model_hash", BLOCK, flip_hex), "index"),
    ("blocks.proposer_id", Change("blocks", "proposer_id", BLOCK, flip_hex), "index"),
    ("blocks.header_bytes", Change("blocks", "header_bytes", BLOCK, bump_timestamp), "hash"),
    ("blocks.header_bytes-garbled", Change("blocks", "header_bytes", BLOCK, lambda v: v[:-1]), "header"),
    ("blocks.signature", Change("blocks", "signature", BLOCK, flip_bit), "signature"),
    ("blocks.signature-short", Change("blocks", "signature", BLOCK, lambda v: v[:63]), "signature"),
    ("update_records.height", Change("update_records", "height", RECORD, lambda v: 1000), "records"),
    ("update_records.position", Change("update_records", "position", RECORD, lambda v: 7), "records"),
    ("update_records.trainer_id", Change("update_records", "trainer_id", RECORD, flip_hex), "record-index"),
    ("update_records.update_hash", Change("update_records", "update_hash", RECORD, flip_hex), "record-index"),
    ("update_records.samples", Change("update_records", "samples", RECORD, lambda v: v + 1), "record-index"),
    ("update_records.record_bytes",
     Change("update_records", "record_bytes", RECORD, lambda v: v.replace(b'"samples":', b'"samples":9')),
     "record-signature"),
    ("update_records.signature", Change("update_records", "signature", RECORD, flip_bit), "record-signature"),
    ("model_chunks.height", Change("model_chunks", "height", CHUNK, lambda v: 1000), "model"),
    ("model_chunks.seq", Change("model_chunks", "seq", CHUNK, lambda v: 50), "model"),
    ("model_chunks.digest", Change("model_chunks", "digest", CHUNK, flip_hex), "model"),
    ("model_chunks.data", Change("model_chunks", "data", CHUNK, lambda v: flip_bit(v, -10)), "model"),
    ("cosignatures.signature", Change("cosignatures", "signature", COSIG, flip_bit), "cosignature"),
    ("cosignatures.signer_key", Change("cosignatures", "signer_key", COSIG, flip_hex), "cosignature"),
]

# Whole-row changes: (id, SQL statements, check).
ROW_CASES = [
    ("delete-middle-record", [f"DELETE FROM update_records WHERE {RECORD}"], "records"),
    ("delete-last-record", [f"DELETE FROM update_records WHERE height = {MIDDLE} AND position = 2"], "merkle"),
    ("swap-weight-chunks", [f"UPDATE model_chunks SET seq = 99 WHERE height = {MIDDLE} AND seq = 0",
                            f"UPDATE model_chunks SET seq = 0 WHERE height = {MIDDLE} AND seq = 1",
                            f"UPDATE model_chunks SET seq = 1 WHERE height = {MIDDLE} AND seq = 99"], "model"),
    ("delete-middle-block", [f"DELETE FROM {t} WHERE height = {MIDDLE}"
                             for t in ("cosignatures", "model_chunks", "update_records", "blocks")], "height"),
]


def delete_newest_block(url: str, height: int) -> None:
    with raw_connection(url) as conn:
        for table in ("cosignatures", "model_chunks", "update_records", "blocks"):
            conn.execute(text(f"DELETE FROM {table} WHERE height = :h"), {"h": height})


def verify_copy(url: str, checkpoint_path, **kwargs):
    store = LedgerStore(url)
    try:
        return verify_chain(store, checkpoint=Checkpoint.read(checkpoint_path), **kwargs)
    finally:
        store.close()


def test_untouched_copy_verifies_to_the_built_head(chain_template, chain_copy):
    report = verify_copy(chain_copy, chain_template.checkpoint)
    assert (report.head_height, report.head_hash, report.blocks, report.records, report.cosignatures,
            report.models_checked) == (5, chain_template.heads[-1].hash, 6, 15, 11, 6)


def test_template_chain_spans_several_weight_chunks_per_block(chain_template):
    with raw_connection(chain_template.url) as conn:
        chunks = conn.execute(text(f"SELECT COUNT(*) FROM model_chunks WHERE height = {MIDDLE}")).scalar_one()
    assert chunks >= 2


@pytest.mark.parametrize("change,check", [c[1:] for c in COLUMN_CASES], ids=[c[0] for c in COLUMN_CASES])
def test_changed_column_is_detected_at_its_height(chain_template, chain_copy, change, check):
    with raw_connection(chain_copy) as conn:
        change.apply(conn)
    with pytest.raises(VerificationError) as caught:
        verify_copy(chain_copy, chain_template.checkpoint)
    assert (caught.value.height, caught.value.check) == (MIDDLE, check), str(caught.value)


@pytest.mark.parametrize("statements,check", [c[1:] for c in ROW_CASES], ids=[c[0] for c in ROW_CASES])
def test_changed_rows_are_detected_at_their_height(chain_template, chain_copy, statements, check):
    with raw_connection(chain_copy) as conn:
        for statement in statements:
            conn.execute(text(statement))
    with pytest.raises(VerificationError) as caught:
        verify_copy(chain_copy, chain_template.checkpoint)
    assert (caught.value.height, caught.value.check) == (MIDDLE, check), str(caught.value)


def test_changed_header_is_detected_without_the_model_pass(chain_template, chain_copy):
    with raw_connection(chain_copy) as conn:
        Change("blocks", "signature", BLOCK, flip_bit).apply(conn)
    with pytest.raises(VerificationError, match=f"height {MIDDLE}"):
        verify_copy(chain_copy, chain_template.checkpoint, check_models=False)


def test_deleted_newest_block_is_detected_with_the_checkpoint(chain_template, chain_copy):
    newest = chain_template.heads[-1].height
    delete_newest_block(chain_copy, newest)
    with pytest.raises(VerificationError) as caught:
        verify_copy(chain_copy, chain_template.checkpoint)
    assert (caught.value.height, caught.value.check) == (newest, "checkpoint"), str(caught.value)


def test_deleted_newest_block_is_invisible_without_the_checkpoint(chain_template, chain_copy):
    # Why the checkpoint exists: a truncated chain is internally consistent.
    delete_newest_block(chain_copy, chain_template.heads[-1].height)
    store = LedgerStore(chain_copy)
    try:
        assert verify_chain(store).head_hash == chain_template.heads[-2].hash
    finally:
        store.close()


def test_load_weights_blob_refuses_a_changed_chunk(chain_copy):
    with raw_connection(chain_copy) as conn:
        Change("model_chunks", "data", CHUNK, lambda v: flip_bit(v, -10)).apply(conn)
    store = LedgerStore(chain_copy)
    try:
        with pytest.raises(StoreError, match=f"height {MIDDLE}"):
            store.load_weights_blob(MIDDLE)
    finally:
        store.close()


def test_load_weights_refuses_a_changed_chunk_whose_digest_was_updated_to_match(chain_copy):
    with raw_connection(chain_copy) as conn:
        data = bytes(conn.execute(text(f"SELECT data FROM model_chunks WHERE {CHUNK}")).scalar_one())
        changed = flip_bit(data, -10)
        conn.execute(text(f"UPDATE model_chunks SET data = :d, digest = :h WHERE {CHUNK}"),
                     {"d": changed, "h": hashlib.sha256(changed).hexdigest()})
    store = LedgerStore(chain_copy)
    try:
        blob_served = len(store.load_weights_blob(MIDDLE)) > 0     # chunk digests hold: served as stored
        with pytest.raises(StoreError, match=f"height {MIDDLE}: model check failed.*model_hash"):
            store.load_weights(MIDDLE)
    finally:
        store.close()
    assert blob_served
