"""Recorded updates: every update a round received, stored with its block (``--record-updates``) so that anyone can
re-run the block's aggregation rule over them (``main.py verify --recompute``).

Each entry holds the trainer's signed update record, the weights it sent (the chain.tensors blob format, hashing to
the record's ``update_hash``), and what the proposer did with it: ``used`` (it went into the model), ``dropped``
(valid, but the aggregation rule left it out, e.g. Multi-Krum did not select it) or ``refused`` (it failed
validation and never reached the rule). The block header commits to the entries with an RFC 6962 Merkle root in
its params (``UPDATES_ROOT``); the weights are committed through each record's signed ``update_hash``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from chain.block import SignedRecord
from chain.encoding import canonical_bytes
from chain.merkle import merkle_root

USED, DROPPED, REFUSED = "used", "dropped", "refused"
STATUSES = (USED, DROPPED, REFUSED)
UPDATES_ROOT = "updates_root"   # header params key: Merkle root of the block's recorded updates
EXCLUDED = "excluded"           # header params key: [[trainer id, reason], ...] of updates not used
AGGREGATE = "aggregate"         # header params key: the aggregation rule (fl.robust spec); absent: fedavg
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class RecordedUpdate:
    """One update a round received, as the block stores it."""

    record: SignedRecord   # the trainer's signed account (round, base, update hash, samples)
    status: str            # USED, DROPPED or REFUSED
    reason: str            # why it was not used ("" when used); may note a clipping when used
    blob: bytes            # the weights as sent (chain.tensors.encode_weights format)

    @property
    def leaf(self) -> bytes:
        """The Merkle leaf: the record, its signature, the status and the reason, as canonical JSON."""
        return canonical_bytes({"type": "recorded-update", "record": self.record.record_bytes.hex(),
                                "signature": self.record.signature.hex(), "status": self.status,
                                "reason": self.reason})


def updates_root(updates: Sequence[RecordedUpdate]) -> str:
    return merkle_root([u.leaf for u in updates])


def excluded_of(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(trainer id, reason) of each update a block's params say was received but not used."""
    value = params.get(EXCLUDED, [])
    if not isinstance(value, list):
        return []
    return [(str(item[0]), str(item[1])) for item in value
            if isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)]
