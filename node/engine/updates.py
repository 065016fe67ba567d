"""The proposer's side of a round whose super nodes forward every update (``Plan.forwards``): check each update
against the base model, run the round's aggregation rule (fl.robust) over the valid ones
in selection order, and say what happened to each, for the block (used records, the excluded list) and, with
``--record-updates``, for the ledger (chain.updates). ``verify --recompute`` (node.engine.recompute) replays
exactly this from the stored updates."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from chain.block import SignedRecord
from chain.tensors import encode_weights
from chain.updates import DROPPED, MAX_REASON_CHARS, REFUSED, USED, RecordedUpdate
from fl.robust import Rule, aggregate
from fl.server import REJECTED, check_update
from node.engine.types import Announcement, Base, Partial, Weights


@dataclass
class Aggregated:
    """A forwarded round's aggregate and what became of every update."""

    weights: Weights                                   # the rule's aggregate over the shared tensors
    records: list[SignedRecord]                        # the used updates' records, in selection order
    excluded: list[tuple[str, str]]                    # (edge id, why) of updates that arrived but were not used
    recorded: list[RecordedUpdate] = field(default_factory=list)   # every update with weights matching its
                                                                   # record, in selection order (when recording)


class NothingUsable(ValueError):
    """No update of the round survived validation and the rule: the round has no new model."""

    def __init__(self, excluded: list[tuple[str, str]], why: str = ""):
        super().__init__(why or "no update passed validation")
        self.excluded = excluded


def clip_reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def aggregate_updates(partials: Sequence[Partial], announcement: Announcement, base: Base, rule: Rule,
                      max_norm: float | None = None, keep_updates: bool = False) -> Aggregated:
    """Validate every forwarded update with ``fl.server.check_update`` against the base and ``max_norm`` (that its
    weights hash to its record's update hash was checked where they arrived: ``serde.read_partial`` for a peer's
    partial, the Fit call for this node's own remote edges; in-process edges sign the weights they hold), aggregate
    the valid ones with ``rule`` in selection order, and list the rest as excluded with their reason
    (``keep_updates``: every update also comes back encoded, to be recorded). A refused update never takes an
    honest one with it. Raises NothingUsable when no update is left or the rule cannot run (e.g. too few for
    Multi-Krum)."""
    position = {node_id: i for i, node_id in enumerate(announcement.participants)}
    arrived = sorted((u for p in partials for u in p.updates), key=lambda u: position[u.record.record.trainer_id])
    entries: list[tuple[SignedRecord, Mapping[str, np.ndarray], str]] = []   # (record, weights, refusal or "")
    excluded: list[tuple[str, str]] = []
    for update in arrived:
        try:
            check_update(update.weights, base.weights, max_norm)
        except ValueError as exc:
            entries.append((update.record, update.weights, clip_reason(f"{REJECTED}{exc}")))
            excluded.append((update.record.record.trainer_id, entries[-1][2]))
        else:
            entries.append((update.record, update.weights, ""))
    candidates = [(signed, weights) for signed, weights, why in entries if not why]
    if not candidates:
        raise NothingUsable(excluded)
    try:
        outcome = aggregate(rule, base.weights, [(w, s.record.samples) for s, w in candidates])
    except ValueError as exc:
        raise NothingUsable(excluded, f"the aggregation rule {rule.spec()} cannot run: {exc}") from None
    verdict = {s.record_bytes: (used, note) for (s, _), used, note in zip(candidates, outcome.used, outcome.notes,
                                                                          strict=True)}
    records: list[SignedRecord] = []
    recorded: list[RecordedUpdate] = []
    for signed, weights, why in entries:
        if why:
            status, reason = REFUSED, why
        else:
            used, note = verdict[signed.record_bytes]
            status, reason = (USED, note) if used else (DROPPED, note)
            if used:
                records.append(signed)
            else:
                excluded.append((signed.record.trainer_id, clip_reason(note)))
        if keep_updates:
            recorded.append(RecordedUpdate(signed, status, clip_reason(reason), encode_weights(weights)))
    return Aggregated(outcome.weights, records, _in_order(excluded, position), recorded)


def _in_order(excluded: list[tuple[str, str]], position: Mapping[str, int]) -> list[tuple[str, str]]:
    return sorted(excluded, key=lambda item: position.get(item[0], len(position)))
