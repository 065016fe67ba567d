"""Check blocks: one in memory against the head it must extend (verify_block), or a whole stored chain (verify_chain).

Both run the same checks (link, signatures, authority, co-signatures, records and Merkle root, the recorded updates'
root, model hash); a stored chain adds the checks of what storage adds (the hash and indexed columns, record
positions, chunk digests); a block received whole also has each recorded update's record and weights checked (a
stored chain's recorded updates are checked by their root only: their weights are not read).
Finality (chain.validators): block h >= 1 is final when distinct keys of the validator set in force before it (the
set after block h-1) co-signed it, only such keys, and more than half of that set; genesis is exempt.
"""
from __future__ import annotations

import dataclasses
import hmac
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chain.block import BlockHeader, Cosignature, MalformedError, SignedBlock, SignedRecord
from chain.checkpoint import Checkpoint
from chain.encoding import ZERO_HASH, EncodingError, sha256_hex
from chain.merkle import merkle_root
from chain.source import ChainSource, StoredBlock, StoredUpdate
from chain.tensors import decode_weights, model_hash
from chain.updates import MAX_REASON_CHARS, STATUSES, UPDATES_ROOT, RecordedUpdate
from chain.validators import MembershipError, is_membership, membership_change, quorum, validators_after


class VerificationError(Exception):
    """The first thing found wrong: which height, which check, and what exactly."""

    def __init__(self, height: int, check: str, detail: str):
        super().__init__(f"height {height}: {check} check failed: {detail}")
        self.height = height
        self.check = check
        self.detail = detail


@dataclass(frozen=True)
class Head:
    """The newest block of a chain: what the next block must link to (the one head type of chain, storage, node)."""

    height: int         # the block's height
    hash: str           # SHA-256 of its header bytes
    model_hash: str     # the model it records: the next block's base_model_hash
    round: int          # the FL round it closes

    @classmethod
    def of(cls, block: SignedBlock) -> Head:
        header = block.header
        return cls(header.height, block.hash, header.model_hash, header.round)


def extends(head: Head | None, header: BlockHeader) -> bool:
    """Whether ``header`` is the next block after ``head`` (genesis when ``head`` is None): height and prev_hash."""
    if head is None:
        return header.height == 0 and _same(header.prev_hash, ZERO_HASH)
    return header.height == head.height + 1 and _same(header.prev_hash, head.hash)


@dataclass(frozen=True)
class VerifiedBlock:
    """A block with everything it carries, either built and signed by this node's Ledger or returned by verify_block."""

    block: SignedBlock
    records: tuple[SignedRecord, ...]
    weights_blob: bytes                         # the encoded model (chain.tensors format), hashing to model_hash
    cosignatures: tuple[Cosignature, ...] = ()  # each valid for this block, one per signer
    updates: tuple[RecordedUpdate, ...] = ()    # recorded updates (chain.updates), committed by the header

    @property
    def header(self) -> BlockHeader:
        return self.block.header

    @property
    def head(self) -> Head:
        """The head this block becomes once added."""
        return Head.of(self.block)

    def cosigned(self, cosignatures: Iterable[Cosignature]) -> VerifiedBlock:
        """This block with ``cosignatures`` added; each must be valid for it and from a new signer."""
        combined = self.cosignatures + tuple(cosignatures)
        _check_cosignatures(self.header.height, self.block.hash, combined)
        return dataclasses.replace(self, cosignatures=combined)

    def validators_after(self, validators: Collection[str]) -> frozenset[str]:
        """The validator set after this block, given the set in force before it; VerificationError ("membership")
        when it is a membership change that cannot apply to that set."""
        return _validators_after(self.header.height, validators, self.header)

    def check_final(self, validators: Collection[str]) -> frozenset[str]:
        """Check that this block is final under ``validators``, the set in force before it, and return the set
        after it. Raises VerificationError unless every co-signer is in the set and more than half of the set
        co-signed (distinct keys; ``cosigned`` keeps them distinct). Genesis has no co-signatures and is exempt."""
        check_final(self.header.height, self.cosignatures, validators)
        return self.validators_after(validators)


def verify_block(block: SignedBlock, records: Iterable[SignedRecord], weights_blob: bytes,
                 cosignatures: Iterable[Cosignature] = (), *, prev: Head | None,
                 authorities: Collection[str] | None = None, check_model: bool = True,
                 validators: Collection[str] | None = None,
                 updates: Iterable[RecordedUpdate] = ()) -> VerifiedBlock:
    """Check a block received whole against ``prev``, the head it must extend (None for genesis).

    Checks the header, height and link, the proposer signature (and that the proposer is one of ``authorities``
    when given), every co-signature, every record signature, the Merkle root and totals, a membership block's
    shape, the recorded ``updates`` (chain.updates: committed by the header's UPDATES_ROOT, or none without one;
    each record signed, for this round and base model, distinct trainers, and with ``check_model`` its weights
    hashing to the record's update_hash), and (``check_model``) that the blob decodes and hashes to the header's
    model_hash. With
    ``validators``, the set in force before the block, it must also be final under that set
    (``VerifiedBlock.check_final``); None skips that check, for a block still being co-signed. Raises
    VerificationError naming the height and the check; a block that does not extend ``prev`` fails the "height"
    or "link" check (see ``extends``).
    """
    height = prev.height + 1 if prev is not None else 0
    header = _parse_header(height, block)
    if header.height != height:
        raise VerificationError(height, "height", f"expected block {height}, header says height {header.height}")
    _check_link(height, header, prev)
    _check_signature(height, block, header, authorities)
    signed_records, cosigs = tuple(records), tuple(cosignatures)
    _check_cosignatures(height, block.hash, cosigs)
    _check_records(height, header, signed_records)
    _check_membership_shape(height, header, prev)
    recorded = tuple(updates)
    _check_updates(height, header, recorded, check_model)
    if check_model:
        check_weights(height, header, weights_blob)
    verified = VerifiedBlock(block, signed_records, bytes(weights_blob), cosigs, recorded)
    if validators is not None:
        verified.check_final(validators)
    return verified


@dataclass(frozen=True)
class VerifyReport:
    head_height: int
    head_hash: str
    blocks: int
    records: int
    cosignatures: int
    models_checked: int
    validators: tuple[str, ...] = ()   # the validator set at the head (public keys, sorted)


def verify_chain(source: ChainSource, *, check_models: bool = True, checkpoint: Checkpoint | None = None,
                 authorities: Iterable[str] | None = None, checkpoint_keys: Iterable[str] = ()) -> VerifyReport:
    """Raise VerificationError at the lowest failing height; return a report for an intact chain.

    Pass one checks headers, links, signatures and Merkle roots; pass two re-hashes stored weights.
    ``authorities`` are the public keys allowed to propose; by default the genesis proposer's and, for each block,
    those of the validator set in force before it.
    Every block after genesis must be final under the validator set in force before it, which is tracked along
    the chain (chain.validators); the report names the set at the head.
    A checkpoint must be signed by an authority, a co-signer, or one of ``checkpoint_keys`` (the verifying node's
    own key: a node that only syncs signs its checkpoint itself).
    """
    allowed = set(authorities) if authorities is not None else None
    prev: Head | None = None
    blocks: list[tuple[StoredBlock, BlockHeader]] = []
    records = cosigs = 0
    validators: frozenset[str] = frozenset()
    failure: VerificationError | None = None
    for stored in source.iter_blocks():
        # By default any validator in force may propose (a validator takes over from a failed proposer), as may
        # the genesis proposer, the chain's authority.
        proposers = allowed if authorities is not None or allowed is None else allowed | validators
        try:
            header = check_block(stored, prev, proposers, validators)
            validators = _validators_after(stored.height, validators, header)
        except VerificationError as exc:
            failure = exc
            break
        if allowed is None:
            allowed = {header.proposer_key}
        blocks.append((stored, header))
        records += len(stored.records)
        cosigs += len(stored.cosignatures)
        prev = Head(stored.height, stored.hash, header.model_hash, header.round)
    models = 0
    if check_models:
        for stored, header in blocks:
            if failure is not None and stored.height >= failure.height:
                break
            try:
                check_model(stored, header)
            except VerificationError as exc:
                failure = exc
                break
            models += 1
    if failure is None and checkpoint is not None:
        _check_checkpoint(checkpoint, [stored for stored, _ in blocks], (allowed or set()) | set(checkpoint_keys))
    if failure is not None:
        raise failure
    if not blocks:
        raise VerificationError(0, "genesis", "the chain is empty")
    head = blocks[-1][0]
    return VerifyReport(head.height, head.hash, len(blocks), records, cosigs, models, tuple(sorted(validators)))


def check_block(stored: StoredBlock, prev: Head | None, allowed: Collection[str] | None,
                validators: Collection[str] | None = None) -> BlockHeader:
    """Check one stored block against its predecessor ``prev`` (everything but the weights) and, with
    ``validators`` (the set in force before it), that it is final under that set; raise VerificationError."""
    h = prev.height + 1 if prev is not None else 0
    if stored.height != h:
        raise VerificationError(h, "height", f"expected block {h}, found row with height {stored.height}")
    signed = SignedBlock(bytes(stored.header_bytes), bytes(stored.signature))
    header = _parse_header(h, signed)
    if header.height != h:
        raise VerificationError(h, "height", f"header says height {header.height}")
    if not _same(signed.hash, stored.hash):
        raise VerificationError(h, "hash", f"stored hash {stored.hash} != SHA-256 of header {signed.hash}")
    _check_indexed(h, "index", header.to_dict(), stored.indexed)
    _check_link(h, header, prev)
    _check_signature(h, signed, header, allowed)
    cosignatures = [Cosignature(key, bytes(sig)) for key, sig in stored.cosignatures]
    _check_cosignatures(h, stored.hash, cosignatures)
    if validators is not None:
        check_final(h, cosignatures, validators)
    _check_membership_shape(h, header, prev)
    for expected_pos, row in enumerate(stored.records):
        if row.position != expected_pos:
            raise VerificationError(h, "records", f"record positions are not 0..n-1 (found {row.position})")
    _check_records(h, header, [SignedRecord(bytes(r.record_bytes), bytes(r.signature)) for r in stored.records],
                   [r.indexed for r in stored.records])
    _check_stored_updates(h, header, stored.updates)
    return header


def read_blob(stored: StoredBlock) -> bytes:
    """A stored block's weight blob, each chunk checked against its recorded digest (not decoded)."""
    h = stored.height
    chunks = stored.load_chunks() if stored.load_chunks is not None else []
    if not chunks:
        raise VerificationError(h, "model", "no stored weights")
    for expected_seq, chunk in enumerate(chunks):
        if chunk.seq != expected_seq:
            raise VerificationError(h, "model", f"weight chunks are not 0..n-1 (found {chunk.seq})")
        if not _same(sha256_hex(bytes(chunk.data)), chunk.digest):
            raise VerificationError(h, "model", f"weight chunk {chunk.seq} does not match its digest")
    return b"".join(bytes(c.data) for c in chunks)


def check_model(stored: StoredBlock, header: BlockHeader | None = None) -> dict[str, np.ndarray]:
    """A stored block's weights, decoded once and checked against its chunk digests and model hash.

    ``header`` is the block's parsed header when the caller has it. Raises VerificationError.
    """
    blob = read_blob(stored)
    if header is None:
        header = _parse_header(stored.height, SignedBlock(bytes(stored.header_bytes), bytes(stored.signature)))
    return check_weights(stored.height, header, blob)


def check_weights(height: int, header: BlockHeader, blob: bytes) -> dict[str, np.ndarray]:
    """Decode a weight blob and check it hashes to the header's model_hash; return the weights."""
    try:
        weights = decode_weights(blob)
    except EncodingError as exc:
        raise VerificationError(height, "model", f"stored weights do not decode: {exc}") from exc
    if not _same(model_hash(weights), header.model_hash):
        raise VerificationError(height, "model", "stored weights do not hash to the block's model_hash")
    return weights


# ---- the checks both verifiers share ------------------------------------------------------------------------------

def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(str(a).encode(), str(b).encode())


def _parse_header(height: int, block: SignedBlock) -> BlockHeader:
    try:
        return block.header
    except MalformedError as exc:
        raise VerificationError(height, "header", str(exc)) from exc


def _check_link(height: int, header: BlockHeader, prev: Head | None) -> None:
    prev_hash = prev.hash if prev is not None else ZERO_HASH
    if not _same(header.prev_hash, prev_hash):
        raise VerificationError(height, "link", f"prev_hash {header.prev_hash} != previous block hash {prev_hash}")
    if prev is not None and not _same(header.base_model_hash, prev.model_hash):
        raise VerificationError(height, "link", "base_model_hash is not the previous block's model_hash")


def _check_signature(height: int, block: SignedBlock, header: BlockHeader,
                     allowed: Collection[str] | None) -> None:
    try:
        block.check()
    except MalformedError as exc:
        raise VerificationError(height, "signature", str(exc)) from exc
    if allowed is not None and header.proposer_key not in allowed:
        raise VerificationError(height, "signature",
                                f"proposer {header.proposer_id} is not an authority of this chain")


def _check_cosignatures(height: int, block_hash: str, cosignatures: Sequence[Cosignature]) -> None:
    seen: set[str] = set()
    for cosig in cosignatures:
        if cosig.signer_key in seen:
            raise VerificationError(height, "cosignature", f"key {cosig.signer_key[:16]}... co-signed twice")
        seen.add(cosig.signer_key)
        if not cosig.valid_for(height, block_hash):
            raise VerificationError(height, "cosignature", f"bad co-signature by key {cosig.signer_key[:16]}...")


def check_final(height: int, cosignatures: Sequence[Cosignature], validators: Collection[str]) -> None:
    """Finality of block ``height`` under ``validators`` (the set in force before it): every co-signer in the set,
    each once, and more than half of the set. Genesis is exempt. The signatures themselves are checked apart."""
    if height == 0:
        return
    signers: set[str] = set()
    for cosig in cosignatures:
        if cosig.signer_key not in validators:
            raise VerificationError(height, "cosignature",
                                    f"key {cosig.signer_key[:16]}... co-signed but is not a validator")
        if cosig.signer_key in signers:
            raise VerificationError(height, "cosignature", f"key {cosig.signer_key[:16]}... co-signed twice")
        signers.add(cosig.signer_key)
    need = quorum(validators)
    if len(signers) < need:
        raise VerificationError(height, "quorum", f"{len(signers)} of {len(validators)} validators co-signed; "
                                                  f"a final block needs {need}")


def _validators_after(height: int, validators: Collection[str], header: BlockHeader) -> frozenset[str]:
    try:
        return validators_after(validators, header)
    except MembershipError as exc:
        raise VerificationError(height, "membership", str(exc)) from exc


def _check_membership_shape(height: int, header: BlockHeader, prev: Head | None) -> None:
    """A membership block's params and shape (chain.validators.membership_change), and its round: the previous
    block's, since it closes no round."""
    if not is_membership(header):
        return
    try:
        membership_change(header)
    except MembershipError as exc:
        raise VerificationError(height, "membership", str(exc)) from exc
    if prev is not None and header.round != prev.round:
        raise VerificationError(height, "membership", f"a membership block keeps the round of the block before "
                                                      f"it ({prev.round}), not {header.round}")


def _check_indexed(height: int, check: str, values: Mapping[str, Any], indexed: Mapping[str, Any]) -> None:
    for column, value in indexed.items():
        if column not in values or values[column] != value:
            raise VerificationError(height, check, f"column {column}={value!r} does not match the signed bytes")


def _check_records(height: int, header: BlockHeader, records: Sequence[SignedRecord],
                   indexed: Sequence[Mapping[str, Any]] = ()) -> None:
    """Record signatures, round and base model, optional indexed columns, then Merkle root and totals."""
    leaves, samples = [], 0
    for pos, signed in enumerate(records):
        try:
            record = signed.check()
        except MalformedError as exc:
            raise VerificationError(height, "record-signature", f"record {pos}: {exc}") from exc
        if indexed:
            _check_indexed(height, "record-index", record.to_dict(), indexed[pos])
        if record.round != header.round or record.base_model_hash != header.base_model_hash:
            raise VerificationError(height, "records", f"record {pos} is for another round or base model")
        leaves.append(signed.leaf)
        samples += record.samples
    root = merkle_root(leaves)
    if not _same(root, header.records_root):
        raise VerificationError(height, "merkle",
                                f"root of {len(leaves)} records {root} != header {header.records_root}")
    if len(leaves) != header.participants or samples != header.total_samples:
        raise VerificationError(height, "merkle", "participants or total_samples do not match the records")


def _check_updates_root(height: int, header: BlockHeader, leaves: Sequence[bytes]) -> None:
    """The leaves of a block's recorded updates against the root its header commits to; none without one."""
    if UPDATES_ROOT not in header.params:
        if leaves:
            raise VerificationError(height, "updates", f"{len(leaves)} recorded update(s), but the header commits "
                                                       "to none")
        return
    root = merkle_root(list(leaves))
    committed = header.params[UPDATES_ROOT]
    if not isinstance(committed, str) or not _same(root, committed):
        raise VerificationError(height, "updates", f"root of {len(leaves)} recorded updates {root} != header "
                                                   f"{header.params[UPDATES_ROOT]}")


def _check_updates(height: int, header: BlockHeader, updates: Sequence[RecordedUpdate], check_model: bool) -> None:
    """Recorded updates received whole: the root, then each record's signature, round and base model, status,
    reason and trainer (each once), and with ``check_model`` that its weights hash to the record's update_hash."""
    _check_updates_root(height, header, [u.leaf for u in updates])
    trainers: set[str] = set()
    for pos, update in enumerate(updates):
        try:
            record = update.record.check()
        except MalformedError as exc:
            raise VerificationError(height, "updates", f"recorded update {pos}: {exc}") from exc
        if record.round != header.round or not _same(record.base_model_hash, header.base_model_hash):
            raise VerificationError(height, "updates", f"recorded update {pos} is for another round or base model")
        if update.status not in STATUSES:
            raise VerificationError(height, "updates", f"recorded update {pos} has unknown status "
                                                       f"{update.status[:20]!r}")
        if len(update.reason) > MAX_REASON_CHARS:
            raise VerificationError(height, "updates", f"recorded update {pos}: reason longer than "
                                                       f"{MAX_REASON_CHARS} characters")
        if record.trainer_id in trainers:
            raise VerificationError(height, "updates", f"trainer {record.trainer_id} has two recorded updates")
        trainers.add(record.trainer_id)
        if check_model:
            try:
                weights = decode_weights(update.blob)
            except EncodingError as exc:   # TensorFormatError is an EncodingError
                raise VerificationError(height, "updates", f"recorded update {pos}: weights do not decode: "
                                                           f"{exc}") from exc
            if not _same(model_hash(weights), record.update_hash):
                raise VerificationError(height, "updates", f"recorded update {pos}: weights do not hash to its "
                                                           "record's update_hash")


def _check_stored_updates(height: int, header: BlockHeader, rows: Sequence[StoredUpdate]) -> None:
    """Stored recorded-update rows (weights not read): positions 0..n-1 and their leaves against the root."""
    for expected_pos, row in enumerate(rows):
        if row.position != expected_pos:
            raise VerificationError(height, "updates", f"recorded update positions are not 0..n-1 "
                                                       f"(found {row.position})")
    _check_updates_root(height, header, [
        RecordedUpdate(SignedRecord(bytes(r.record_bytes), bytes(r.signature)), r.status, r.reason, b"").leaf
        for r in rows])


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
