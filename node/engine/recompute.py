"""`main.py verify --recompute`: re-run each block's aggregation from the updates recorded with it and check that
it gives the block's model hash, bit for bit.

For a block with recorded updates (``--record-updates``): every stored update must hash to its trainer's signed
record; the refused ones must still fail validation (``fl.server.check_update`` with the run's
``max_update_norm``) and the others pass it; the block's rule (``params["aggregate"]``, default fedavg) over the
used and dropped ones, in their stored order, must use exactly those marked used, with the same notes; the
block's records must be the used ones; and the base model (the block before) overlaid with the aggregate must
hash to the block's model hash. The first height where anything differs is named. Blocks without recorded
updates (genesis, membership changes, rounds run without recording) are counted as skipped.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from chain.tensors import TensorFormatError, decode_weights, model_hash
from chain.updates import AGGREGATE, DROPPED, REFUSED, UPDATES_ROOT, USED, RecordedUpdate
from chain.verify import VerifiedBlock
from fl.robust import aggregate, parse_rule
from fl.server import check_update
from node.engine.updates import clip_reason
from storage.store import StoreError


class RecomputeError(ValueError):
    """A block's model does not follow from its recorded updates (the message names the height)."""


@dataclass(frozen=True)
class RecomputeReport:
    blocks: int      # blocks re-aggregated from their recorded updates
    skipped: int     # blocks without recorded updates
    seconds: float


class BlockSource(Protocol):
    """What recompute reads: blocks in height order with their recorded updates (storage.store.LedgerStore)."""

    def blocks(self, start: int = 0, end: int | None = None) -> Iterator[VerifiedBlock]: ...


def recompute_chain(store: BlockSource) -> RecomputeReport:
    """Re-aggregate every block of ``store`` (anything with ``blocks()`` yielding VerifiedBlocks with their
    recorded updates, as storage.store.LedgerStore does) that has recorded updates; RecomputeError at the first
    that does not reproduce."""
    started = time.perf_counter()
    done = skipped = 0
    previous: VerifiedBlock | None = None
    blocks = store.blocks()
    while True:
        try:
            block = next(blocks, None)
        except StoreError as exc:   # a stored chunk whose digest does not match: the message names the height
            raise RecomputeError(str(exc)) from None
        if block is None:
            break
        if UPDATES_ROOT in block.header.params:
            if previous is None:
                raise RecomputeError(f"height {block.header.height}: recorded updates but no block before it")
            recompute_block(block, _weights(previous))
            done += 1
        else:
            skipped += 1
        previous = block
    return RecomputeReport(done, skipped, time.perf_counter() - started)


def recompute_block(block: VerifiedBlock, base: Mapping[str, np.ndarray]) -> None:
    """Check one block against its recorded updates and its base model (see the module docstring)."""
    header = block.header
    height = header.height
    params = header.params
    try:
        rule = parse_rule(str(params.get(AGGREGATE, "fedavg")))
        bound = params.get("max_update_norm")
        max_norm = float(bound) if bound is not None else None
    except ValueError as exc:
        raise RecomputeError(f"height {height}: the block's aggregation parameters do not parse: {exc}") from None
    entries = [(u, _update_weights(height, i, u)) for i, u in enumerate(block.updates)]
    inputs = []
    for i, (update, weights) in enumerate(entries):
        trainer = update.record.record.trainer_id
        try:
            check_update(weights, base, max_norm)
        except ValueError as exc:
            if update.status != REFUSED:
                raise RecomputeError(f"height {height}: update {i} of {trainer} is marked {update.status} but fails "
                                     f"validation: {exc}") from None
            continue
        if update.status == REFUSED:
            raise RecomputeError(f"height {height}: update {i} of {trainer} is marked refused ({update.reason}) but "
                                 "passes validation")
        inputs.append((update, weights))
    if not inputs:
        raise RecomputeError(f"height {height}: no recorded update passes validation, yet the block has a model")
    try:
        outcome = aggregate(rule, base, [(w, u.record.record.samples) for u, w in inputs])
    except ValueError as exc:
        raise RecomputeError(f"height {height}: the rule {rule.spec()} cannot run over the recorded updates: "
                             f"{exc}") from None
    for (update, _), used, note in zip(inputs, outcome.used, outcome.notes, strict=True):
        expected = USED if used else DROPPED
        if update.status != expected or update.reason != clip_reason(note):
            raise RecomputeError(f"height {height}: {rule.spec()} marks the update of "
                                 f"{update.record.record.trainer_id} {expected} ({note or 'no note'}); the block "
                                 f"recorded {update.status} ({update.reason or 'no note'})")
    used_records = [u.record.record_bytes for u, _ in inputs if u.status == USED]
    if used_records != [r.record_bytes for r in block.records]:
        raise RecomputeError(f"height {height}: the block's update records are not the recorded updates marked "
                             "used")
    digest = model_hash({**base, **outcome.weights})
    if digest != header.model_hash:
        raise RecomputeError(f"height {height}: re-aggregating {len(inputs)} recorded update(s) with "
                             f"{rule.spec()} gives model {digest[:16]}..., the block records "
                             f"{header.model_hash[:16]}...")


def _update_weights(height: int, index: int, update: RecordedUpdate) -> dict[str, np.ndarray]:
    record = update.record.record
    try:
        weights = decode_weights(update.blob)
    except TensorFormatError as exc:
        raise RecomputeError(f"height {height}: recorded update {index} of {record.trainer_id} does not decode: "
                             f"{exc}") from None
    if model_hash(weights) != record.update_hash:
        raise RecomputeError(f"height {height}: recorded update {index} of {record.trainer_id} does not hash to "
                             "its signed record's update hash")
    return weights


def _weights(block: VerifiedBlock) -> dict[str, np.ndarray]:
    return decode_weights(block.weights_blob)
