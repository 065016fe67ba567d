"""The SQL ledger store: appends whole blocks in one transaction and reads them back for verification."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import delete, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from chain.block import Cosignature, SignedBlock, SignedRecord
from chain.encoding import ZERO_HASH, sha256_hex
from chain.source import StoredBlock, StoredChunk, StoredRecord
from chain.tensors import split_chunks
from chain.verify import VerificationError, check_block, check_model
from storage.engine import StorageUnavailable, make_engine
from storage.models import Base, BlockRow, ChunkRow, ClientStateRow, CosignatureRow, NodeRow, RecordRow

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 * 1024 * 1024   # escaped by PyMySQL this stays far below MariaDB's 16 MB max_allowed_packet
READ_PAGE = 500                 # blocks per query when walking the chain


class StoreError(ValueError):
    """A block was refused; nothing was written."""


class NotExtendingHead(StoreError):
    """The block's height or previous hash does not follow the stored head."""


@dataclass(frozen=True)
class Head:
    height: int
    hash: str
    model_hash: str


class LedgerStore:
    """Blocks, records, weights and co-signatures in one SQL database (SQLite or MySQL)."""

    def __init__(self, url: str, *, chunk_bytes: int = CHUNK_BYTES):
        self.url = url
        self.chunk_bytes = chunk_bytes
        self.engine = make_engine(url)
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise StorageUnavailable(f"cannot open database {_safe(url)}: {exc.orig}") from exc
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # ---- writing -------------------------------------------------------------------------------------------

    def append(self, block: SignedBlock, records: list[SignedRecord], weights_blob: bytes, *,
               cosignatures: Iterable[Cosignature] = (), client_state: dict[str, bytes] | None = None) -> None:
        """Check the block against the head and write it whole, in one transaction, or refuse it."""
        cosignatures = list(cosignatures)   # iterated twice below: a generator would be checked but not written
        if len({c.signer_key for c in cosignatures}) != len(cosignatures):
            raise StoreError("block refused: the same node co-signed it twice")
        stored = self._as_stored(block, records, weights_blob, cosignatures)
        with self.session.begin() as session:
            head = self._head(session)
            prev_hash, prev_model = (head.hash, head.model_hash) if head else (ZERO_HASH, None)
            expected = head.height + 1 if head else 0
            authorities = {self._genesis_key(session)} if head else None
            header = _checked(stored, expected, prev_hash, prev_model, authorities)
            session.add(BlockRow(height=header.height, hash=block.hash, prev_hash=header.prev_hash,
                                 round=header.round, timestamp_ms=header.timestamp_ms,
                                 model_hash=header.model_hash, proposer_id=header.proposer_id,
                                 header_bytes=block.header_bytes, signature=block.signature))
            session.flush()
            for pos, rec in enumerate(records):
                parsed = rec.record
                session.add(RecordRow(height=header.height, position=pos, trainer_id=parsed.trainer_id,
                                      update_hash=parsed.update_hash, samples=parsed.samples,
                                      record_bytes=rec.record_bytes, signature=rec.signature))
            for chunk in stored.load_chunks():
                session.add(ChunkRow(height=header.height, seq=chunk.seq, digest=chunk.digest, data=chunk.data))
                session.flush()   # one INSERT per chunk keeps each statement under max_allowed_packet
            for cosig in cosignatures:
                session.add(CosignatureRow(height=header.height, signer_key=cosig.signer_key,
                                           signature=cosig.signature))
            for client_id, data in (client_state or {}).items():
                session.merge(ClientStateRow(client_id=client_id, height=header.height, data=data))
            try:
                session.flush()
            except IntegrityError as exc:
                raise NotExtendingHead(f"block {header.height} was written concurrently: {exc.orig}") from exc

    def add_cosignatures(self, height: int, cosignatures: Iterable[Cosignature]) -> None:
        """Attach co-signatures to a stored block; each must be valid for it."""
        with self.session.begin() as session:
            row = session.get(BlockRow, height)
            if row is None:
                raise StoreError(f"no block at height {height}")
            for cosig in cosignatures:
                if not cosig.valid_for(height, row.hash):
                    raise StoreError(f"co-signature by {cosig.signer_key[:16]}... is not valid for block {height}")
                session.merge(CosignatureRow(height=height, signer_key=cosig.signer_key, signature=cosig.signature))

    def _as_stored(self, block: SignedBlock, records: list[SignedRecord], weights_blob: bytes,
                   cosignatures: Iterable[Cosignature]) -> StoredBlock:
        try:
            header = block.header
        except ValueError as exc:
            raise StoreError(f"block refused: {exc}") from exc
        chunks = [StoredChunk(i, c, sha256_hex(c)) for i, c in enumerate(split_chunks(weights_blob, self.chunk_bytes))]
        rec_rows = [StoredRecord(i, r.record_bytes, r.signature, {}) for i, r in enumerate(records)]
        return StoredBlock(header.height, block.hash, block.header_bytes, block.signature, {}, rec_rows,
                           [(c.signer_key, c.signature) for c in cosignatures], lambda: chunks)

    # ---- reading -------------------------------------------------------------------------------------------

    def head(self) -> Head | None:
        with self.session() as session:
            return self._head(session)

    @staticmethod
    def _head(session: Session) -> Head | None:
        row = session.execute(select(BlockRow.height, BlockRow.hash, BlockRow.model_hash)
                              .order_by(BlockRow.height.desc()).limit(1)).first()
        return Head(row.height, row.hash, row.model_hash) if row else None

    @staticmethod
    def _genesis_key(session: Session) -> str:
        row = session.get(BlockRow, 0)
        return SignedBlock(row.header_bytes, row.signature).header.proposer_key if row else ""

    def count(self) -> int:
        with self.session() as session:
            return session.scalar(select(func.count()).select_from(BlockRow)) or 0

    def get_block(self, height: int) -> tuple[SignedBlock, list[SignedRecord]]:
        with self.session() as session:
            row = session.get(BlockRow, height)
            if row is None:
                raise StoreError(f"no block at height {height}")
            recs = session.scalars(select(RecordRow).where(RecordRow.height == height)
                                   .order_by(RecordRow.position)).all()
            return (SignedBlock(row.header_bytes, row.signature),
                    [SignedRecord(r.record_bytes, r.signature) for r in recs])

    def cosignatures(self, height: int) -> list[Cosignature]:
        with self.session() as session:
            rows = session.scalars(select(CosignatureRow).where(CosignatureRow.height == height)).all()
            return [Cosignature(r.signer_key, r.signature) for r in rows]

    def load_weights_blob(self, height: int) -> bytes:
        """The block's weights, checked against each chunk digest and the block's model hash."""
        stored = next(self.iter_blocks(height, height), None)
        if stored is None:
            raise StoreError(f"no block at height {height}")
        try:
            check_model(stored)
        except VerificationError as exc:
            raise StoreError(str(exc)) from exc
        return b"".join(c.data for c in stored.load_chunks())

    def _chunks(self, height: int) -> list[StoredChunk]:
        with self.session() as session:
            rows = session.execute(select(ChunkRow.seq, ChunkRow.data, ChunkRow.digest)
                                   .where(ChunkRow.height == height).order_by(ChunkRow.seq)).all()
            return [StoredChunk(r.seq, r.data, r.digest) for r in rows]

    def iter_blocks(self, start: int = 0, end: int | None = None) -> Iterator[StoredBlock]:
        """Blocks in height order, read a page at a time with their records and co-signatures."""
        next_height = start
        while end is None or next_height <= end:
            with self.session() as session:
                query = select(BlockRow).where(BlockRow.height >= next_height).order_by(BlockRow.height)
                if end is not None:
                    query = query.where(BlockRow.height <= end)
                rows = session.scalars(query.limit(READ_PAGE)).all()
                if not rows:
                    return
                lo, hi = rows[0].height, rows[-1].height
                records: dict[int, list[StoredRecord]] = {}
                for r in session.scalars(select(RecordRow).where(RecordRow.height.between(lo, hi))
                                         .order_by(RecordRow.height, RecordRow.position)):
                    records.setdefault(r.height, []).append(StoredRecord(
                        r.position, r.record_bytes, r.signature,
                        {"trainer_id": r.trainer_id, "update_hash": r.update_hash, "samples": r.samples}))
                cosigs: dict[int, list[tuple[str, bytes]]] = {}
                for c in session.scalars(select(CosignatureRow).where(CosignatureRow.height.between(lo, hi))
                                         .order_by(CosignatureRow.height, CosignatureRow.signer_key)):
                    cosigs.setdefault(c.height, []).append((c.signer_key, c.signature))
            for row in rows:
                yield StoredBlock(
                    row.height, row.hash, row.header_bytes, row.signature,
                    {"height": row.height, "prev_hash": row.prev_hash, "round": row.round,
                     "timestamp_ms": row.timestamp_ms, "model_hash": row.model_hash,
                     "proposer_id": row.proposer_id},
                    records.get(row.height, []), cosigs.get(row.height, []),
                    lambda h=row.height: self._chunks(h))
            next_height = hi + 1

    # ---- client state and nodes ------------------------------------------------------------------------------

    def client_states(self) -> dict[str, tuple[int, bytes]]:
        with self.session() as session:
            return {r.client_id: (r.height, r.data) for r in session.scalars(select(ClientStateRow))}

    def upsert_node(self, node_id: str, public_key: str, role: str, address: str, last_seen_ms: int) -> None:
        with self.session.begin() as session:
            session.merge(NodeRow(node_id=node_id, public_key=public_key, role=role, address=address,
                                  last_seen_ms=last_seen_ms))

    def reset(self) -> None:
        """Drop every block and client state (``--fresh``)."""
        with self.session.begin() as session:
            for table in (ClientStateRow, CosignatureRow, ChunkRow, RecordRow, BlockRow):
                session.execute(delete(table))


def _checked(stored: StoredBlock, expected: int, prev_hash: str, prev_model: str | None,
             authorities: set[str] | None):
    try:
        header = SignedBlock(stored.header_bytes, stored.signature).header
    except ValueError as exc:
        raise StoreError(f"block refused: {exc}") from exc
    if header.height != expected or header.prev_hash != prev_hash:
        raise NotExtendingHead(f"block {header.height} does not extend the head "
                               f"(expected height {expected} after {prev_hash[:16]}...)")
    try:
        result = check_block(stored, expected, prev_hash, prev_model, authorities)
        check_model(stored)
    except VerificationError as exc:
        raise StoreError(f"block {header.height} refused: {exc.check}: {exc.detail}") from exc
    return result


def _safe(url: str) -> str:
    """A URL with its password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<database>"
