"""Block headers and update records: frozen dataclasses, their canonical bytes, signing and strict parsing."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Protocol

from chain.encoding import ZERO_HASH, EncodingError, canonical_bytes, is_hex_digest, parse_canonical, sha256_hex
from chain.keys import NODE_ID_HEX_LEN, PUBLIC_KEY_HEX_LEN, SIGNATURE_BYTES, NodeKey, node_id_for, verify_signature
from chain.merkle import merkle_root

FORMAT_VERSION = 1
ALGORITHMS = ("fedavg", "fedper")


class MalformedError(EncodingError):
    """Bytes that should hold a header or record do not (missing field, wrong type, bad signature length)."""


@dataclass(frozen=True)
class BlockHeader:
    """What a block commits to. Every field is hashed; none is a float."""

    height: int                 # 0 for genesis, then +1 per block
    prev_hash: str              # hash of the previous header (64 zeros for genesis)
    timestamp_ms: int           # proposer's clock (or logical clock in reproducible runs), integer ms
    round: int                  # FL round this block closes (0 for genesis)
    algorithm: str              # "fedavg" or "fedper"
    params: dict[str, Any]      # algorithm parameters; reals as decimal strings
    base_model_hash: str        # model the round started from (genesis: its own model)
    model_hash: str             # the aggregated model this block records
    records_root: str           # RFC 6962 Merkle root of the round's signed update records
    participants: int           # number of update records
    total_samples: int          # sum of the records' sample counts
    metrics: dict[str, int]     # evaluation metrics as integers (e.g. accuracy_bp, loss_micro)
    proposer_id: str            # node id derived from proposer_key
    proposer_key: str           # proposer's Ed25519 public key, hex
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["type"] = "block"
        return out

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> BlockHeader:
        return cls(**_parse(data, "block", _HEADER_TYPES))


@dataclass(frozen=True)
class UpdateRecord:
    """One trainer's signed account of its local update in one round."""

    round: int                  # round the update belongs to
    trainer_id: str             # node id derived from trainer_key
    trainer_key: str            # trainer's Ed25519 public key, hex
    base_model_hash: str        # model the trainer started from
    update_hash: str            # model hash of the weights it sent back
    samples: int                # number of local training samples
    metrics: dict[str, int]     # local metrics as integers
    version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["type"] = "update"
        return out

    def to_bytes(self) -> bytes:
        return canonical_bytes(self.to_dict())

    @classmethod
    def from_bytes(cls, data: bytes) -> UpdateRecord:
        return cls(**_parse(data, "update", _RECORD_TYPES))


@dataclass(frozen=True)
class SignedRecord:
    """The exact signed bytes of an update record and the trainer's signature over them."""

    record_bytes: bytes
    signature: bytes

    @classmethod
    def create(cls, record: UpdateRecord, key: NodeKey) -> SignedRecord:
        data = record.to_bytes()
        return cls(data, key.sign(data))

    @cached_property
    def record(self) -> UpdateRecord:
        """The parsed record; parsed on first access (MalformedError if the bytes are not a record), then kept.

        The frozen dataclass still works: cached_property writes the instance ``__dict__`` directly, and a failed
        parse caches nothing, so every access to a malformed record raises.
        """
        return UpdateRecord.from_bytes(self.record_bytes)

    @property
    def leaf(self) -> bytes:
        """Merkle leaf: record bytes then the fixed-length signature, so the tree commits to both."""
        return self.record_bytes + self.signature

    def check(self) -> UpdateRecord:
        """Parse and check the signature and id; raise MalformedError naming what is wrong."""
        if len(self.signature) != SIGNATURE_BYTES:
            raise MalformedError(f"update signature must be {SIGNATURE_BYTES} bytes, got {len(self.signature)}")
        record = self.record
        if node_id_for(record.trainer_key) != record.trainer_id:
            raise MalformedError("trainer_id does not match trainer_key")
        if not verify_signature(record.trainer_key, self.signature, self.record_bytes):
            raise MalformedError(f"bad signature on update record of trainer {record.trainer_id}")
        return record


@dataclass(frozen=True)
class SignedBlock:
    """The exact signed header bytes and the proposer's signature; the block hash is SHA-256 of the bytes."""

    header_bytes: bytes
    signature: bytes

    @classmethod
    def create(cls, header: BlockHeader, key: NodeKey) -> SignedBlock:
        data = header.to_bytes()
        return cls(data, key.sign(data))

    @cached_property
    def header(self) -> BlockHeader:
        """The parsed header; parsed on first access (MalformedError if the bytes are not a header), then kept.

        Treat it as read-only: its ``params`` and ``metrics`` dicts are shared by every access.
        """
        return BlockHeader.from_bytes(self.header_bytes)

    @cached_property
    def hash(self) -> str:
        return sha256_hex(self.header_bytes)

    def check(self) -> BlockHeader:
        """Parse and check the proposer signature and id; raise MalformedError naming what is wrong."""
        if len(self.signature) != SIGNATURE_BYTES:
            raise MalformedError(f"block signature must be {SIGNATURE_BYTES} bytes, got {len(self.signature)}")
        header = self.header
        if node_id_for(header.proposer_key) != header.proposer_id:
            raise MalformedError("proposer_id does not match proposer_key")
        if not verify_signature(header.proposer_key, self.signature, self.header_bytes):
            raise MalformedError(f"bad proposer signature on block {header.height}")
        return header


def cosign_message(height: int, block_hash: str) -> bytes:
    """What a super node signs to co-sign a block."""
    return canonical_bytes({"type": "cosign", "height": height, "hash": block_hash, "version": FORMAT_VERSION})


@dataclass(frozen=True)
class Cosignature:
    """A super node's signature over ``cosign_message(height, hash)``."""

    signer_key: str
    signature: bytes

    @classmethod
    def create(cls, height: int, block_hash: str, key: NodeKey) -> Cosignature:
        return cls(key.public_hex, key.sign(cosign_message(height, block_hash)))

    def valid_for(self, height: int, block_hash: str) -> bool:
        return verify_signature(self.signer_key, self.signature, cosign_message(height, block_hash))


def records_root(records: Sequence[SignedRecord]) -> str:
    return merkle_root([r.leaf for r in records])


class Predecessor(Protocol):
    """What the next header needs of the block before it: a BlockHeader, or a chain.verify.Head."""

    @property
    def height(self) -> int: ...

    @property
    def model_hash(self) -> str: ...


def build_header(*, prev: Predecessor | None, prev_hash: str | None, timestamp_ms: int, round: int, algorithm: str,
                 params: dict[str, Any], model_hash: str, records: Sequence[SignedRecord], metrics: dict[str, int],
                 proposer: NodeKey) -> BlockHeader:
    """Assemble the next header after ``prev`` (None for genesis) from a round's outcome."""
    parsed = [r.record for r in records]
    return BlockHeader(
        height=0 if prev is None else prev.height + 1,
        prev_hash=ZERO_HASH if prev is None else str(prev_hash),
        timestamp_ms=timestamp_ms,
        round=round,
        algorithm=algorithm,
        params=params,
        base_model_hash=model_hash if prev is None else prev.model_hash,
        model_hash=model_hash,
        records_root=records_root(records),
        participants=len(records),
        total_samples=sum(r.samples for r in parsed),
        metrics=metrics,
        proposer_id=proposer.node_id,
        proposer_key=proposer.public_hex,
    )


Check = Callable[[Any], bool]


def _hex(n: int) -> Check:
    return lambda v: is_hex_digest(v, n)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _int_dict(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool) for x in v.values())


_HEADER_TYPES: dict[str, Check] = {
    "height": _int, "prev_hash": _hex(64), "timestamp_ms": _int, "round": _int,
    "algorithm": lambda v: v in ALGORITHMS, "params": lambda v: isinstance(v, dict),
    "base_model_hash": _hex(64), "model_hash": _hex(64), "records_root": _hex(64),
    "participants": _int, "total_samples": _int, "metrics": _int_dict,
    "proposer_id": _hex(NODE_ID_HEX_LEN), "proposer_key": _hex(PUBLIC_KEY_HEX_LEN),
    "version": lambda v: v == FORMAT_VERSION,
}
_RECORD_TYPES: dict[str, Check] = {
    "round": _int, "trainer_id": _hex(NODE_ID_HEX_LEN), "trainer_key": _hex(PUBLIC_KEY_HEX_LEN),
    "base_model_hash": _hex(64), "update_hash": _hex(64), "samples": _int, "metrics": _int_dict,
    "version": lambda v: v == FORMAT_VERSION,
}


def _parse(data: bytes, kind: str, checks: dict[str, Check]) -> dict[str, Any]:
    try:
        value = parse_canonical(bytes(data))
    except EncodingError as exc:
        raise MalformedError(f"{kind}: {exc}") from exc
    if not isinstance(value, dict):
        raise MalformedError(f"{kind}: expected a JSON object")
    if value.pop("type", None) != kind:
        raise MalformedError(f"{kind}: missing or wrong 'type' field")
    missing = sorted(set(checks) - set(value))
    if missing:
        raise MalformedError(f"{kind}: missing field(s) {', '.join(missing)}")
    extra = sorted(set(value) - set(checks))
    if extra:
        raise MalformedError(f"{kind}: unknown field(s) {', '.join(extra)}")
    for name, ok in checks.items():
        if not ok(value[name]):
            raise MalformedError(f"{kind}: field {name} has a bad value {value[name]!r}")
    return value
