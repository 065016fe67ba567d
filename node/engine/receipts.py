"""Update records: an edge node signs what it trained (sign_update); a super node checks it (check_receipt); metrics
become the integers the ledger stores (integer_metrics)."""
from __future__ import annotations

from collections.abc import Mapping

from chain.block import SignedRecord, UpdateRecord
from chain.encoding import to_fixed
from chain.keys import NodeKey
from fl.participant import FitRes

ACC_SCALE = 10_000          # accuracies on the ledger are basis points
LOSS_SCALE = 1_000_000      # losses on the ledger are millionths


def integer_metrics(metrics: Mapping[str, float], prefix: str = "") -> dict[str, int]:
    """Float metrics as ledger integers: accuracy -> ``accuracy_bp``, anything else -> ``<name>_micro``."""
    out: dict[str, int] = {}
    for name, value in metrics.items():
        if value != value:  # NaN: leave it out rather than invent a number
            continue
        if "accuracy" in name:
            out[f"{prefix}{name}_bp"] = to_fixed(value, ACC_SCALE)
        else:
            out[f"{prefix}{name}_micro"] = to_fixed(value, LOSS_SCALE)
    return out


def sign_update(key: NodeKey, round: int, base_hash: str, update_hash: str, res: FitRes) -> SignedRecord:
    """The edge node's signed account of its update: what it started from, what it sent back, on how much data.
    Both hashes come from the caller, who computed each once."""
    record = UpdateRecord(round=round, trainer_id=key.node_id, trainer_key=key.public_hex, base_model_hash=base_hash,
                          update_hash=update_hash, samples=res.samples, metrics=integer_metrics(res.metrics))
    return SignedRecord.create(record, key)


def check_receipt(res: FitRes, round: int, base_hash: str, edge_id: str) -> SignedRecord:
    """A result's receipt must be a signed record by that edge node, for this round and base model, for the result's
    sample count (ValueError naming what is wrong). Its signature and update hash were checked where the result
    arrived (``serde.record_from_msg`` and the weights transfer), or it was signed in this process."""
    receipt = res.receipt
    if not isinstance(receipt, SignedRecord):
        raise ValueError("result carries no signed update record")
    record = receipt.record
    problems = []
    if record.trainer_id != edge_id:
        problems.append(f"signed by {record.trainer_id}")
    if record.round != round:
        problems.append(f"for round {record.round}, not {round}")
    if record.base_model_hash != base_hash:
        problems.append("for another base model")
    if record.samples != res.samples:
        problems.append(f"for {record.samples} samples, the result has {res.samples}")
    if problems:
        raise ValueError(f"update record of {edge_id} rejected: {'; '.join(problems)}")
    return receipt
