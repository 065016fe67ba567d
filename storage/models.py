"""SQLAlchemy 2.0 tables: blocks, update records, weight chunks, recorded updates, co-signatures, client state."""
from __future__ import annotations

from sqlalchemy import BigInteger, ForeignKey, Integer, LargeBinary, String
from sqlalchemy.dialects.mysql import LONGBLOB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A plain BLOB stops at 64 KB on MySQL; weight chunks and headers use LONGBLOB there.
Blob = LargeBinary().with_variant(LONGBLOB(), "mysql", "mariadb")
Hash = String(64)
NodeId = String(32)


class Base(DeclarativeBase):
    pass


class BlockRow(Base):
    """One block: the signed header bytes, the signature, and columns copied out of the header for queries."""

    __tablename__ = "blocks"
    height: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(Hash, unique=True)
    prev_hash: Mapped[str] = mapped_column(Hash)
    round: Mapped[int] = mapped_column(BigInteger)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    model_hash: Mapped[str] = mapped_column(Hash)
    proposer_id: Mapped[str] = mapped_column(NodeId)
    header_bytes: Mapped[bytes] = mapped_column(Blob)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class RecordRow(Base):
    """One signed update record of a block, at its Merkle leaf position."""

    __tablename__ = "update_records"
    height: Mapped[int] = mapped_column(BigInteger, ForeignKey("blocks.height"), primary_key=True,
                                        autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    trainer_id: Mapped[str] = mapped_column(NodeId, index=True)
    update_hash: Mapped[str] = mapped_column(Hash)
    samples: Mapped[int] = mapped_column(BigInteger)
    record_bytes: Mapped[bytes] = mapped_column(Blob)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class ChunkRow(Base):
    """A piece of a block's weight blob (chunked to stay under MySQL's max_allowed_packet)."""

    __tablename__ = "model_chunks"
    height: Mapped[int] = mapped_column(BigInteger, ForeignKey("blocks.height"), primary_key=True,
                                        autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    digest: Mapped[str] = mapped_column(Hash)
    data: Mapped[bytes] = mapped_column(Blob)


class RecordedUpdateRow(Base):
    """A recorded update of a block (chain/updates.py, ``--record-updates``), at its Merkle leaf position; its
    weights are in RecordedUpdateChunkRow."""

    __tablename__ = "recorded_updates"
    height: Mapped[int] = mapped_column(BigInteger, ForeignKey("blocks.height"), primary_key=True,
                                        autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    trainer_id: Mapped[str] = mapped_column(NodeId, index=True)
    status: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str] = mapped_column(String(320))   # at most chain.updates.MAX_REASON_CHARS, with room to spare
    record_bytes: Mapped[bytes] = mapped_column(Blob)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class RecordedUpdateChunkRow(Base):
    """A piece of a recorded update's weight blob (chunked like the model)."""

    __tablename__ = "recorded_update_chunks"
    height: Mapped[int] = mapped_column(BigInteger, ForeignKey("blocks.height"), primary_key=True,
                                        autoincrement=False)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    digest: Mapped[str] = mapped_column(Hash)
    data: Mapped[bytes] = mapped_column(Blob)


class CosignatureRow(Base):
    """A super node's co-signature over a block."""

    __tablename__ = "cosignatures"
    height: Mapped[int] = mapped_column(BigInteger, ForeignKey("blocks.height"), primary_key=True,
                                        autoincrement=False)
    signer_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    signature: Mapped[bytes] = mapped_column(LargeBinary(64))


class ClientStateRow(Base):
    """A simulated client's private state (FedPer personal layers), written with the block it belongs to."""

    __tablename__ = "client_state"
    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    height: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[bytes] = mapped_column(Blob)
