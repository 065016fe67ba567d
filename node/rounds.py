"""One federated round recorded on the ledger: the logic the simulator and the super nodes share."""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from chain.block import MalformedError, SignedBlock, SignedRecord, UpdateRecord
from chain.encoding import to_fixed
from chain.keys import NodeKey
from chain.tensors import model_hash
from fl.participant import EvalRes, FitIns, FitRes, Participant
from fl.server import RoundOutcome, run_round
from node.ledger import Ledger

log = logging.getLogger(__name__)

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


def sign_update(key: NodeKey, round: int, base_hash: str, res: FitRes) -> SignedRecord:
    """The trainer's signed account of its update: what it started from, what it sent back, on how much data."""
    record = UpdateRecord(round=round, trainer_id=key.node_id, trainer_key=key.public_hex, base_model_hash=base_hash,
                          update_hash=model_hash(res.weights), samples=res.samples,
                          metrics=integer_metrics(res.metrics))
    return SignedRecord.create(record, key)


class SigningParticipant:
    """Wraps a participant so each fit result carries the trainer's signed update record as its receipt."""

    def __init__(self, inner: Participant, key: NodeKey):
        self.inner = inner
        self.key = key
        self.participant_id = inner.participant_id

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        res = self.inner.fit(weights, ins)
        return dataclasses.replace(res, receipt=sign_update(self.key, ins.round, model_hash(weights), res))

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return self.inner.evaluate(weights)


def check_receipt(res: FitRes, round: int, base_hash: str) -> SignedRecord:
    """A result's receipt must be a valid signed record for this round and base model."""
    receipt = res.receipt
    if not isinstance(receipt, SignedRecord):
        raise MalformedError("result carries no signed update record")
    record = receipt.check()
    if record.round != round or record.base_model_hash != base_hash or record.samples != res.samples:
        raise MalformedError(f"update record of {record.trainer_id} is for another round, model or sample count")
    return receipt


@dataclass(frozen=True)
class RoundSummary:
    round: int
    block: SignedBlock
    durable: object                   # Future resolving when the block is written
    weights: dict[str, np.ndarray]    # the new global (shared) model
    metrics: dict[str, float]
    failures: list[tuple[str, str]]
    seconds: float


def recorded_round(*, round: int, participants: Sequence[Participant], global_weights: dict[str, np.ndarray],
                   ins_for: Callable[[int, Participant], FitIns], ledger: Ledger, algorithm: str,
                   params: dict[str, str], evaluate: Callable[[dict[str, np.ndarray]], dict[str, float]],
                   timestamp_ms: int, max_workers: int = 1,
                   client_state: Callable[[], dict[str, bytes]] | None = None,
                   on_result: Callable[[str, FitRes], None] | None = None) -> RoundSummary:
    """Train, aggregate, evaluate and propose the block; the block is written in the background."""
    start = time.perf_counter()
    base_hash = model_hash(global_weights)
    records: list[SignedRecord] = []

    def keep_receipt(pid: str, res: FitRes) -> None:
        records.append(res.receipt)  # type: ignore[arg-type]  # checked by _ReceiptChecked before folding
        if on_result is not None:
            on_result(pid, res)

    checked = [_ReceiptChecked(p, round, base_hash) for p in participants]
    outcome: RoundOutcome = run_round(round, checked, global_weights, ins_for, max_workers=max_workers,
                                      on_result=keep_receipt)
    new_weights = {**global_weights, **outcome.weights}
    metrics = _train_metrics(outcome)
    metrics.update(evaluate(new_weights))
    block, durable = ledger.propose(round=round, algorithm=algorithm, params=params, weights=new_weights,
                                    records=records, metrics=integer_metrics(metrics), timestamp_ms=timestamp_ms,
                                    client_state=client_state() if client_state else None)
    return RoundSummary(round, block, durable, new_weights, metrics, outcome.failures,
                        time.perf_counter() - start)


class _ReceiptChecked:
    """A participant whose results are refused (counted as its failure) unless the receipt is valid."""

    def __init__(self, inner: Participant, round: int, base_hash: str):
        self.inner, self.round, self.base_hash = inner, round, base_hash
        self.participant_id = inner.participant_id

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        res = self.inner.fit(weights, ins)
        check_receipt(res, self.round, self.base_hash)
        return res

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return self.inner.evaluate(weights)


def _train_metrics(outcome: RoundOutcome) -> dict[str, float]:
    """Sample-weighted mean of the clients' own training loss and accuracy."""
    total = sum(res.samples for _, res in outcome.results) or 1
    out: dict[str, float] = {}
    for name in ("loss", "accuracy"):
        values = [(res.metrics[name], res.samples) for _, res in outcome.results if name in res.metrics]
        if values:
            out[f"train_{name}"] = sum(v * n for v, n in values) / total
    return out
