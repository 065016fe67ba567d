"""Walk a stored chain and check every hash, link, signature, Merkle root and (optionally) stored model."""
from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from chain.block import BlockHeader, Cosignature, MalformedError, SignedBlock, SignedRecord
from chain.checkpoint import Checkpoint
from chain.encoding import ZERO_HASH, EncodingError, sha256_hex
from chain.merkle import merkle_root
from chain.source import ChainSource, StoredBlock
from chain.tensors import decode_weights, model_hash


class VerificationError(Exception):
    """The first thing found wrong: which height, which check, and what exactly."""

    def __init__(self, height: int, check: str, detail: str):
        super().__init__(f"height {height}: {check} check failed: {detail}")
        self.height = height
        self.check = check
        self.detail = detail


@dataclass(frozen=True)
class VerifyReport:
    head_height: int
    head_hash: str
    blocks: int
    records: int
    cosignatures: int
    models_checked: int


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(str(a).encode(), str(b).encode())


def verify_chain(source: ChainSource, *, check_models: bool = True, checkpoint: Checkpoint | None = None,
                 authorities: Iterable[str] | None = None, checkpoint_keys: Iterable[str] = ()) -> VerifyReport:
    """Raise VerificationError at the lowest failing height; return a report for an intact chain.

    Pass one checks headers, links, signatures and Merkle roots; pass two re-hashes stored weights.
    ``authorities`` are the public keys allowed to propose; by default the genesis proposer's.
    A checkpoint must be signed by an authority, a co-signer, or one of ``checkpoint_keys`` (the verifying node's
    own key: a node that only syncs signs its checkpoint itself).
    """
    allowed = set(authorities) if authorities is not None else None
    prev_hash, prev_model, expected_height = ZERO_HASH, None, 0
    blocks: list[StoredBlock] = []
    records = cosigs = 0
    failure: VerificationError | None = None
    for stored in source.iter_blocks():
        try:
            header = check_block(stored, expected_height, prev_hash, prev_model, allowed)
        except VerificationError as exc:
            failure = exc
            break
        if allowed is None:
            allowed = {header.proposer_key}
        blocks.append(stored)
        records += len(stored.records)
        cosigs += len(stored.cosignatures)
        prev_hash, prev_model, expected_height = stored.hash, header.model_hash, expected_height + 1
    models = 0
    if check_models:
        for stored in blocks:
            if failure is not None and stored.height >= failure.height:
                break
            try:
                check_model(stored)
            except VerificationError as exc:
                failure = exc
                break
            models += 1
    if failure is None and checkpoint is not None:
        _check_checkpoint(checkpoint, blocks, (allowed or set()) | set(checkpoint_keys))
    if failure is not None:
        raise failure
    if not blocks:
        raise VerificationError(0, "genesis", "the chain is empty")
    return VerifyReport(blocks[-1].height, blocks[-1].hash, len(blocks), records, cosigs, models)


def check_block(stored: StoredBlock, height: int, prev_hash: str, prev_model: str | None,
                allowed: set[str] | None) -> BlockHeader:
    """Check one block against its predecessor (everything but the weights); raise VerificationError."""
    h = stored.height
    if h != height:
        raise VerificationError(height, "height", f"expected block {height}, found row with height {h}")
    signed = SignedBlock(bytes(stored.header_bytes), bytes(stored.signature))
    try:
        header = signed.header
    except MalformedError as exc:
        raise VerificationError(h, "header", str(exc)) from exc
    if header.height != h:
        raise VerificationError(h, "height", f"header says height {header.height}")
    if not _same(signed.hash, stored.hash):
        raise VerificationError(h, "hash", f"stored hash {stored.hash} != SHA-256 of header {signed.hash}")
    _check_indexed(h, "index", header.to_dict(), stored.indexed)
    if not _same(header.prev_hash, prev_hash):
        raise VerificationError(h, "link", f"prev_hash {header.prev_hash} != previous block hash {prev_hash}")
    if prev_model is not None and not _same(header.base_model_hash, prev_model):
        raise VerificationError(h, "link", "base_model_hash is not the previous block's model_hash")
    try:
        signed.check()
    except MalformedError as exc:
        raise VerificationError(h, "signature", str(exc)) from exc
    if allowed is not None and header.proposer_key not in allowed:
        raise VerificationError(h, "signature", f"proposer {header.proposer_id} is not an authority of this chain")
    for signer_key, signature in stored.cosignatures:
        if not Cosignature(signer_key, bytes(signature)).valid_for(h, stored.hash):
            raise VerificationError(h, "cosignature", f"bad co-signature by key {signer_key[:16]}...")
    _check_records(stored, header)
    return header


def _check_indexed(height: int, check: str, values: dict, indexed: dict) -> None:
    for column, value in indexed.items():
        if column not in values or values[column] != value:
            raise VerificationError(height, check, f"column {column}={value!r} does not match the signed bytes")


def _check_records(stored: StoredBlock, header: BlockHeader) -> None:
    h = stored.height
    leaves, samples = [], 0
    for expected_pos, row in enumerate(stored.records):
        if row.position != expected_pos:
            raise VerificationError(h, "records", f"record positions are not 0..n-1 (found {row.position})")
        signed = SignedRecord(bytes(row.record_bytes), bytes(row.signature))
        try:
            record = signed.check()
        except MalformedError as exc:
            raise VerificationError(h, "record-signature", f"record {row.position}: {exc}") from exc
        _check_indexed(h, "record-index", record.to_dict(), row.indexed)
        if record.round != header.round or record.base_model_hash != header.base_model_hash:
            raise VerificationError(h, "records", f"record {row.position} is for another round or base model")
        leaves.append(signed.leaf)
        samples += record.samples
    root = merkle_root(leaves)
    if not _same(root, header.records_root):
        raise VerificationError(h, "merkle", f"root of {len(leaves)} stored records {root} != header {header.records_root}")
    if len(leaves) != header.participants or samples != header.total_samples:
        raise VerificationError(h, "merkle", "participants or total_samples do not match the stored records")


def check_model(stored: StoredBlock) -> None:
    """Check a block's stored weight chunks against its model hash; raise VerificationError."""
    h = stored.height
    chunks = stored.load_chunks() if stored.load_chunks is not None else []
    if not chunks:
        raise VerificationError(h, "model", "no stored weights")
    for expected_seq, chunk in enumerate(chunks):
        if chunk.seq != expected_seq:
            raise VerificationError(h, "model", f"weight chunks are not 0..n-1 (found {chunk.seq})")
        if not _same(sha256_hex(bytes(chunk.data)), chunk.digest):
            raise VerificationError(h, "model", f"weight chunk {chunk.seq} does not match its digest")
    try:
        weights = decode_weights(b"".join(bytes(c.data) for c in chunks))
    except EncodingError as exc:
        raise VerificationError(h, "model", f"stored weights do not decode: {exc}") from exc
    header = SignedBlock(bytes(stored.header_bytes), bytes(stored.signature)).header
    if not _same(model_hash(weights), header.model_hash):
        raise VerificationError(h, "model", "stored weights do not hash to the block's model_hash")


def _check_checkpoint(checkpoint: Checkpoint, blocks: list[StoredBlock], trusted: set[str]) -> None:
    head = blocks[-1].height if blocks else -1
    if not checkpoint.valid():
        raise VerificationError(checkpoint.height, "checkpoint", "checkpoint signature is invalid")
    signers = trusted | {key for b in blocks for key, _ in b.cosignatures}
    if checkpoint.signer_key not in signers:
        raise VerificationError(checkpoint.height, "checkpoint", "checkpoint is signed by a node foreign to this chain")
    if checkpoint.height > head:
        raise VerificationError(head + 1, "checkpoint",
                                f"checkpoint names head {checkpoint.height} but the chain ends at {head}: "
                                "newest blocks were deleted")
    if not _same(blocks[checkpoint.height].hash, checkpoint.hash):
        raise VerificationError(checkpoint.height, "checkpoint", "block hash differs from the checkpoint's")
