"""The SQL ledger store: writes verified blocks whole, in one transaction, and reads them back for verification."""
from __future__ import annotations

import functools
import hmac
from collections.abc import Iterator, Sequence

import numpy as np
from sqlalchemy import delete, false, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from chain.block import Cosignature, SignedBlock, SignedRecord
from chain.encoding import ZERO_HASH, sha256_hex
from chain.source import StoredBlock, StoredChunk, StoredRecord, StoredUpdate
from chain.tensors import split_chunks
from chain.updates import RecordedUpdate
from chain.verify import Head, VerificationError, VerifiedBlock, check_model, extends, read_blob
from storage.engine import StorageUnavailable, make_engine
from storage.models import (
    Base,
    BlockRow,
    ChunkRow,
    ClientStateRow,
    CosignatureRow,
    RecordedUpdateChunkRow,
    RecordedUpdateRow,
    RecordRow,
)

__all__ = ["CHUNK_BYTES", "Head", "LedgerStore", "NotExtendingHead", "StoreError"]

CHUNK_BYTES = 4 * 1024 * 1024   # escaped by PyMySQL this stays far below MariaDB's 16 MB max_allowed_packet
READ_PAGE = 500                 # blocks per query when walking the chain


class StoreError(ValueError):
    """A block was refused or a stored one cannot be read back intact; nothing was written."""


class NotExtendingHead(StoreError):
    """The block's height or previous hash does not follow the stored head."""


class LedgerStore:
    """Blocks, records, weights, recorded updates and co-signatures in one SQL database (SQLite or MySQL).

    It holds only verified blocks: ``append`` takes a chain.verify.VerifiedBlock and checks only that it extends
    the stored head. ``verify_chain`` re-checks everything stored (the store is a ChainSource).
    """

    def __init__(self, url: str, *, chunk_bytes: int = CHUNK_BYTES, statement_timeout: float | None = None,
                 connect_timeout: float | None = None):
        """``statement_timeout`` and ``connect_timeout`` (seconds; None: storage.engine's defaults) bound every
        statement (storage.engine.make_engine)."""
        self.url = url
        self.chunk_bytes = chunk_bytes
        self.engine = make_engine(url, statement_timeout=statement_timeout, connect_timeout=connect_timeout)
        try:
            Base.metadata.create_all(self.engine)
        except OperationalError as exc:
            raise StorageUnavailable(f"cannot open database {_safe(url)}: {exc.orig}") from exc
        self.session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # ---- writing -------------------------------------------------------------------------------------------

    def append(self, verified: VerifiedBlock, *, client_state: dict[str, bytes] | None = None) -> None:
        """Write a verified block whole (records, weight chunks, recorded updates with their weight chunks,
        co-signatures, client state) in one transaction.

        Raises NotExtendingHead, writing nothing, unless it is the next block after the stored head.
        """
        block, header = verified.block, verified.header
        chunks = split_chunks(verified.weights_blob, self.chunk_bytes)
        try:
            with self.session.begin() as session:
                head = self._head(session)
                if not extends(head, header):
                    expected, prev_hash = (head.height + 1, head.hash) if head else (0, ZERO_HASH)
                    raise NotExtendingHead(f"block {header.height} does not extend the head "
                                           f"(expected height {expected} after {prev_hash[:16]}...)")
                session.add(BlockRow(height=header.height, hash=block.hash, prev_hash=header.prev_hash,
                                     round=header.round, timestamp_ms=header.timestamp_ms,
                                     model_hash=header.model_hash, proposer_id=header.proposer_id,
                                     header_bytes=block.header_bytes, signature=block.signature))
                session.flush()
                for pos, rec in enumerate(verified.records):
                    parsed = rec.record
                    session.add(RecordRow(height=header.height, position=pos, trainer_id=parsed.trainer_id,
                                          update_hash=parsed.update_hash, samples=parsed.samples,
                                          record_bytes=rec.record_bytes, signature=rec.signature))
                for seq, data in enumerate(chunks):
                    session.add(ChunkRow(height=header.height, seq=seq, digest=sha256_hex(data), data=data))
                    session.flush()   # one INSERT per chunk keeps each statement under max_allowed_packet
                for pos, recorded in enumerate(verified.updates):
                    rec = recorded.record
                    session.add(RecordedUpdateRow(height=header.height, position=pos,
                                                  trainer_id=rec.record.trainer_id, status=recorded.status,
                                                  reason=recorded.reason, record_bytes=rec.record_bytes,
                                                  signature=rec.signature))
                    for seq, data in enumerate(split_chunks(recorded.blob, self.chunk_bytes)):
                        session.add(RecordedUpdateChunkRow(height=header.height, position=pos, seq=seq,
                                                           digest=sha256_hex(data), data=data))
                        session.flush()   # as above: one chunk per INSERT
                for cosig in verified.cosignatures:
                    session.add(CosignatureRow(height=header.height, signer_key=cosig.signer_key,
                                               signature=cosig.signature))
                for client_id, state in (client_state or {}).items():
                    session.merge(ClientStateRow(client_id=client_id, height=header.height, data=state))
                session.flush()
        except IntegrityError as exc:
            if self._has_block(header.height):
                raise NotExtendingHead(f"block {header.height} was written concurrently: {exc.orig}") from exc
            raise StoreError(f"block {header.height} refused by the database: {exc.orig}") from exc

    def probe(self) -> None:
        """Prove that the database accepts writes to every ledger table right now, writing nothing: in one
        transaction, an UPDATE matching no row on each table, then a rollback. Raises what a write would (an
        OperationalError for a lock held elsewhere, a server down or a statement timeout; a ProgrammingError for
        a table gone)."""
        with self.engine.connect() as conn:   # closing it rolls back, also when a statement failed
            conn.execute(update(BlockRow).where(false()).values(height=BlockRow.height))
            conn.execute(update(RecordRow).where(false()).values(height=RecordRow.height))
            conn.execute(update(ChunkRow).where(false()).values(height=ChunkRow.height))
            conn.execute(update(RecordedUpdateRow).where(false()).values(height=RecordedUpdateRow.height))
            conn.execute(update(RecordedUpdateChunkRow).where(false()).values(height=RecordedUpdateChunkRow.height))
            conn.execute(update(CosignatureRow).where(false()).values(height=CosignatureRow.height))
            conn.execute(update(ClientStateRow).where(false()).values(client_id=ClientStateRow.client_id))
            conn.rollback()

    # ---- reading -------------------------------------------------------------------------------------------

    def head(self) -> Head | None:
        with self.session() as session:
            return self._head(session)

    @staticmethod
    def _head(session: Session) -> Head | None:
        row = session.execute(select(BlockRow.height, BlockRow.hash, BlockRow.model_hash, BlockRow.round)
                              .order_by(BlockRow.height.desc()).limit(1)).first()
        return Head(row.height, row.hash, row.model_hash, row.round) if row else None

    def _has_block(self, height: int) -> bool:
        with self.session() as session:
            return session.get(BlockRow, height) is not None

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

    def load_weights(self, height: int) -> dict[str, np.ndarray]:
        """The block's weights, decoded once and checked against each chunk digest and the block's model hash."""
        try:
            return check_model(self._stored(height))
        except VerificationError as exc:
            raise StoreError(str(exc)) from exc

    def load_weights_blob(self, height: int) -> bytes:
        """The block's encoded weights, checked against each chunk digest only (not decoded): for serving peers,
        who verify the model hash themselves."""
        try:
            return read_blob(self._stored(height))
        except VerificationError as exc:
            raise StoreError(str(exc)) from exc

    def blocks(self, start: int = 0, end: int | None = None) -> Iterator[VerifiedBlock]:
        """Stored blocks ``start..end`` (inclusive; ``end`` None: to the head) with their records, blob (chunk
        digests checked), co-signatures and recorded updates (likewise). They count as verified: the store holds
        only verified blocks."""
        for stored in self.iter_blocks(start, end):
            try:
                blob = read_blob(stored)
            except VerificationError as exc:
                raise StoreError(str(exc)) from exc
            recorded = self._with_blobs(stored.height, stored.updates) if stored.updates else []
            yield VerifiedBlock(SignedBlock(stored.header_bytes, stored.signature),
                                tuple(SignedRecord(r.record_bytes, r.signature) for r in stored.records), blob,
                                tuple(Cosignature(key, sig) for key, sig in stored.cosignatures), tuple(recorded))

    def recorded_updates(self, height: int) -> list[RecordedUpdate]:
        """The recorded updates of block ``height`` (chain.updates) with their weights, each chunk checked against
        its digest (not decoded); [] for a block without any. StoreError names the height and position of an
        update whose rows or chunks are not intact."""
        with self.session() as session:
            rows = [_stored_update(r) for r in session.scalars(
                select(RecordedUpdateRow).where(RecordedUpdateRow.height == height)
                .order_by(RecordedUpdateRow.position))]
        return self._with_blobs(height, rows) if rows else []

    def _with_blobs(self, height: int, rows: Sequence[StoredUpdate]) -> list[RecordedUpdate]:
        """Recorded-update rows of block ``height`` joined with their weight chunks (positions and chunk sequence
        0..n-1, each chunk's digest checked)."""
        pieces: dict[int, list[StoredChunk]] = {}
        with self.session() as session:
            for c in session.execute(select(RecordedUpdateChunkRow.position, RecordedUpdateChunkRow.seq,
                                            RecordedUpdateChunkRow.data, RecordedUpdateChunkRow.digest)
                                     .where(RecordedUpdateChunkRow.height == height)
                                     .order_by(RecordedUpdateChunkRow.position, RecordedUpdateChunkRow.seq)):
                pieces.setdefault(c.position, []).append(StoredChunk(c.seq, c.data, c.digest))
        out = []
        for expected_pos, row in enumerate(rows):
            where = f"height {height}: recorded update {row.position}"
            if row.position != expected_pos:
                raise StoreError(f"{where}: positions are not 0..n-1 (expected {expected_pos})")
            chunks = pieces.get(row.position, [])
            if not chunks:
                raise StoreError(f"{where}: no stored weights")
            for expected_seq, chunk in enumerate(chunks):
                if chunk.seq != expected_seq:
                    raise StoreError(f"{where}: weight chunks are not 0..n-1 (found {chunk.seq})")
                if not hmac.compare_digest(sha256_hex(bytes(chunk.data)).encode(), str(chunk.digest).encode()):
                    raise StoreError(f"{where}: weight chunk {chunk.seq} does not match its digest")
            out.append(RecordedUpdate(SignedRecord(bytes(row.record_bytes), bytes(row.signature)), row.status,
                                      row.reason, b"".join(bytes(c.data) for c in chunks)))
        return out

    def _stored(self, height: int) -> StoredBlock:
        stored = next(self.iter_blocks(height, height), None)
        if stored is None:
            raise StoreError(f"no block at height {height}")
        return stored

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
                updates: dict[int, list[StoredUpdate]] = {}   # without weights: verify_chain reads none
                for u in session.scalars(select(RecordedUpdateRow).where(RecordedUpdateRow.height.between(lo, hi))
                                         .order_by(RecordedUpdateRow.height, RecordedUpdateRow.position)):
                    updates.setdefault(u.height, []).append(_stored_update(u))
            for row in rows:
                yield StoredBlock(
                    row.height, row.hash, row.header_bytes, row.signature,
                    {"height": row.height, "prev_hash": row.prev_hash, "round": row.round,
                     "timestamp_ms": row.timestamp_ms, "model_hash": row.model_hash,
                     "proposer_id": row.proposer_id},
                    records.get(row.height, []), cosigs.get(row.height, []),
                    functools.partial(self._chunks, row.height), updates.get(row.height, []))
            next_height = hi + 1

    # ---- client state ----------------------------------------------------------------------------------------

    def client_states(self) -> dict[str, tuple[int, bytes]]:
        with self.session() as session:
            return {r.client_id: (r.height, r.data) for r in session.scalars(select(ClientStateRow))}

    def reset(self) -> None:
        """Drop every block and client state (``--fresh``)."""
        with self.session.begin() as session:
            for table in (ClientStateRow, CosignatureRow, RecordedUpdateChunkRow, RecordedUpdateRow, ChunkRow,
                          RecordRow, BlockRow):
                session.execute(delete(table))


def _stored_update(row: RecordedUpdateRow) -> StoredUpdate:
    return StoredUpdate(row.position, row.record_bytes, row.signature, row.status, row.reason)


def _safe(url: str) -> str:
    """A URL with its password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<database>"
