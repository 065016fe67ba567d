"""Blocks over the wire: stream them out, read them in, verify one fully before co-signing or storing it, catch up."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


from chain.block import BlockHeader, Cosignature, SignedBlock, SignedRecord
from chain.encoding import ZERO_HASH, sha256_hex
from chain.source import StoredBlock, StoredChunk, StoredRecord
from chain.tensors import split_chunks
from chain.verify import VerificationError, check_block, check_model
from node import serde, transport
from node.errors import BadRequestError, StaleRoundError
from node.ledger import Ledger, Tip
from node.options import CHUNK_SIZE, DEADLINES
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import BlockPart as BlockPartMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import HeightRange as HeightRangeMsg

log = logging.getLogger(__name__)


@dataclass
class IncomingBlock:
    """A block read off the wire with everything it carries."""

    block: SignedBlock
    records: list[SignedRecord] = field(default_factory=list)
    cosignatures: list[Cosignature] = field(default_factory=list)
    weights_blob: bytes = b""


def verify_incoming(tip: Tip | None, incoming: IncomingBlock, authority: str | None = None) -> BlockHeader:
    """Check a block fully (signature, link to ``tip``, records, Merkle root, co-signatures, model) before use.

    ``authority``, the chain's proposer key (its genesis proposer), is the only key allowed to sign blocks after
    genesis. A block that does not extend the tip raises StaleRoundError; anything else wrong BadRequestError.
    """
    block = incoming.block
    header = block.header
    expected = tip.header.height + 1 if tip else 0
    prev_hash = tip.hash if tip else ZERO_HASH
    if header.height != expected or header.prev_hash != prev_hash:
        raise StaleRoundError(f"block {header.height} does not extend this node's head (expected height {expected})")
    chunks = [StoredChunk(i, c, sha256_hex(c)) for i, c in enumerate(split_chunks(incoming.weights_blob, CHUNK_SIZE))]
    stored = StoredBlock(header.height, block.hash, block.header_bytes, block.signature, {},
                         [StoredRecord(i, r.record_bytes, r.signature, {}) for i, r in enumerate(incoming.records)],
                         [(c.signer_key, c.signature) for c in incoming.cosignatures], lambda: chunks)
    try:
        check_block(stored, expected, prev_hash, tip.header.model_hash if tip else None,
                    {authority} if authority else None)
        check_model(stored)
    except VerificationError as exc:
        raise BadRequestError(f"block refused: {exc}") from exc
    return header


def block_parts(block: SignedBlock, records: Iterable[SignedRecord], blob: bytes, model_hash: str,
                cosignatures: Iterable[Cosignature] = ()) -> Iterator[BlockPartMsg]:
    """One block as stream messages: block, records, co-signatures, weight chunks."""
    yield BlockPartMsg(block=serde.block_to_msg(block))
    for record in records:
        yield BlockPartMsg(record=serde.record_to_msg(record))
    for cosig in cosignatures:
        yield BlockPartMsg(cosignature=serde.cosig_to_msg(cosig))
    for chunk in transport.blob_chunks(blob, model_hash):
        yield BlockPartMsg(weights=chunk)


def ledger_parts(ledger: Ledger, start: int, end: int) -> Iterator[BlockPartMsg]:
    """Blocks start..end (inclusive) of a ledger as stream messages."""
    ledger.flush()
    for height in range(start, end + 1):
        block, records = ledger.get_block(height)
        cosigs = ledger.store.cosignatures(height)
        yield from block_parts(block, records, ledger.load_weights_blob(height), block.header.model_hash, cosigs)


def read_blocks(parts: Iterable[BlockPartMsg]) -> Iterator[IncomingBlock]:
    """Group a stream of parts into blocks; each blob is size- and hash-checked (BadRequestError otherwise)."""
    current: IncomingBlock | None = None
    assembler: transport.WeightsAssembler | None = None
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "block":
            if current is not None:
                yield _finish(current, assembler)
            current, assembler = IncomingBlock(serde.block_from_msg(part.block)), transport.WeightsAssembler()
        elif current is None or assembler is None:
            raise BadRequestError("a block stream must start with a block message")
        elif kind == "record":
            current.records.append(serde.record_from_msg(part.record))
        elif kind == "cosignature":
            current.cosignatures.append(serde.cosig_from_msg(part.cosignature))
        elif kind == "weights":
            assembler.add(part.weights)
        else:
            raise BadRequestError("empty block stream message")
    if current is not None:
        yield _finish(current, assembler)


def _finish(current: IncomingBlock, assembler: transport.WeightsAssembler | None) -> IncomingBlock:
    assert assembler is not None
    _, current.weights_blob = assembler.finish()
    return current


def sync_from(ledger: Ledger, peer: str) -> int:
    """Fetch, verify and store every block the peer has beyond our tip; return how many were added.

    Raises grpc.RpcError when the peer fails and BadRequestError/StaleRoundError when it sends a bad chain.
    """
    with transport.open_channel(peer) as channel:
        stub = fledger_pb2_grpc.SuperNodeStub(channel)
        head = stub.GetHead(EmptyMsg(), timeout=DEADLINES.query)
        tip = ledger.tip
        start = tip.header.height + 1 if tip else 0
        if head.empty or head.height < start:
            return 0
        added = 0
        stream = stub.GetBlocks(HeightRangeMsg(from_height=start, to_height=head.height), timeout=DEADLINES.sync)
        for incoming in read_blocks(stream):
            verify_incoming(ledger.tip, incoming, ledger.authority)
            ledger.accept(incoming.block, incoming.records, incoming.weights_blob, incoming.cosignatures).result()
            added += 1
    log.info("synced %d block(s) from %s; head now %d", added, peer, ledger.tip.header.height if ledger.tip else -1)
    return added
