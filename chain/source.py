"""What the verifier reads: blocks as stored, with their records, co-signatures, recorded updates and weight chunks."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class StoredRecord:
    """An update record row: the signed bytes plus the columns stored beside them for queries."""

    position: int               # leaf index in the block's Merkle tree
    record_bytes: bytes         # exactly the bytes the trainer signed
    signature: bytes
    indexed: dict[str, Any]     # denormalised columns (trainer_id, update_hash, samples): must match the bytes


@dataclass(frozen=True)
class StoredChunk:
    """One piece of a block's weight blob with the digest recorded when it was written."""

    seq: int
    data: bytes
    digest: str


@dataclass(frozen=True)
class StoredUpdate:
    """A recorded update row (chain.updates) without its weights: what its Merkle leaf is made of."""

    position: int               # leaf index in the block's recorded-updates tree
    record_bytes: bytes         # exactly the bytes the trainer signed
    signature: bytes
    status: str
    reason: str


@dataclass(frozen=True)
class StoredBlock:
    """A block row as read back, with everything attached to it."""

    height: int                             # the primary-key column
    hash: str                               # the stored hash column
    header_bytes: bytes                     # exactly the bytes the proposer signed
    signature: bytes
    indexed: dict[str, Any]                 # denormalised columns (prev_hash, round, ...): must match the bytes
    records: list[StoredRecord]
    cosignatures: list[tuple[str, bytes]] = field(default_factory=list)   # (signer public key hex, signature)
    load_chunks: Callable[[], list[StoredChunk]] | None = None           # lazily reads the weight chunks
    updates: list[StoredUpdate] = field(default_factory=list)            # recorded updates, without weights


class ChainSource(Protocol):
    """Anything the verifier can walk: the SQL store, or an in-memory list in tests."""

    def iter_blocks(self) -> Iterator[StoredBlock]:
        """Every block in ascending height order."""
        ...
