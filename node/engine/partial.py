"""A super node's share of a round (train its selected edge nodes into a partial aggregate), the proposer's checks
of a partial, and how partials are combined: in-process and over gRPC alike.

Determinism: every super node folds its edges in the order of the announcement's participant list (data-share
order), and the proposer combines the partials in the order of each partial's first participant in that list.
With the same assignment of edge nodes to super nodes, the simulator and the network give the same bits.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from chain.block import SignedRecord
from fl.participant import FitRes, Participant
from fl.server import RoundFailed, run_round
from node.engine.errors import BadRequestError
from node.engine.receipts import check_receipt
from node.engine.types import Announcement, Base, EdgeDirectory, Partial, Update, Weights

Roster = Mapping[str, tuple[str, int | None]]   # edge id -> (the super node that listed it, its declared samples)
MAX_SAMPLES = 2**63 - 1   # a record's sample count is a signed 64-bit integer in the ledger's database


def train_partial(sn_id: str, announcement: Announcement, base: Base, directory: EdgeDirectory) -> Partial:
    """Run the round over this super node's edge nodes that the proposer selected; failures are data. Each edge's
    FitIns comes from the announced plan and its position in the selection, as the simulator's client gets it."""
    round = announcement.round
    position = {node_id: i for i, node_id in enumerate(announcement.participants)}
    edges = sorted((e for e in directory.edges() if e.node_id in position), key=lambda e: position[e.node_id])
    if not edges:
        return Partial(sn_id, round, 0, None)
    strategy = announcement.plan.strategy()
    forwards = announcement.plan.forwards
    aggregator = Collector() if forwards else strategy.aggregator()
    participants = [directory.connect(e, base) for e in edges]
    declared = {e.node_id: e.samples for e in edges}
    checked: dict[str, SignedRecord] = {}
    results: list[tuple[str, FitRes]] = []

    def check(participant: Participant, res: FitRes) -> None:
        edge_id = participant.participant_id
        bound = declared.get(edge_id)
        if bound is not None and res.samples > bound:   # the sample count is its weight in the average
            raise ValueError(f"claims {res.samples} samples but declared {bound} at admission")
        checked[edge_id] = check_receipt(res, round, base.model_hash, edge_id)

    def keep(edge_id: str, res: FitRes) -> None:
        results.append((edge_id, res))

    started = time.perf_counter()
    try:
        outcome = run_round(round, participants, base.weights,
                            lambda _i, p: strategy.fit_ins(round, position[p.participant_id]),
                            aggregator, check=check, on_result=keep,
                            max_workers=directory.concurrency or len(participants), validate=not forwards)
    except RoundFailed as exc:
        return Partial(sn_id, round, 0, None, failures=exc.failures)
    finally:
        for p in participants:
            directory.release(p)
    records = [checked[e] for e, _ in results]
    updates = [Update(record, weights) for record, weights in zip(records, aggregator.items, strict=True)] \
        if isinstance(aggregator, Collector) else []
    return Partial(sn_id, round, outcome.total_samples, None if forwards else outcome.weights, records,
                   outcome.failures, weighted_metrics([(r.metrics, r.samples) for _, r in results], prefix="train_"),
                   edge_timings(participants, time.perf_counter() - started), updates)


class Collector:
    """The aggregator of a super node that forwards its edges' updates (``Plan.forwards``): it keeps each update
    whole, in fold order, and aggregates nothing; the proposer validates and aggregates them all."""

    def __init__(self) -> None:
        self.items: list[Weights] = []
        self.count = 0
        self.total_samples = 0

    def add(self, weights: Mapping[str, np.ndarray], samples: int) -> None:
        self.items.append(dict(weights))
        self.count += 1
        self.total_samples += int(samples)

    def result(self) -> Weights:
        return {}


def edge_timings(participants: Sequence[Participant], sn_round_s: float) -> dict[str, float]:
    """Where one super node's share of the round went: the edges' training, the transfers around it, the SN's own
    tail. Remote participants report (call seconds, training seconds) as ``last_fit``; in-process ones do not."""
    calls = [fit for p in participants if (fit := getattr(p, "last_fit", None)) is not None]
    if not calls:
        return {"sn_round_s": sn_round_s}
    train = [t for _, t in calls]
    return {"sn_round_s": sn_round_s,
            "edge_train_max_s": max(train), "edge_train_mean_s": sum(train) / len(train),
            # Fit call time minus training: both weight transfers, (de)serialisation, hashing and signing.
            "transfer_max_s": max(call - t for call, t in calls),
            # After the slowest Fit call returned: folding the last update in and finishing the aggregate.
            "sn_aggregate_s": max(0.0, sn_round_s - max(call for call, _ in calls))}


def weighted_metrics(items: Sequence[tuple[Mapping[str, float], int]], prefix: str = "") -> dict[str, float]:
    """Sample-weighted mean of each metric every item carries."""
    total = sum(n for _, n in items) or 1
    out: dict[str, float] = {}
    for name in sorted({k for m, _ in items for k in m}):
        if all(name in m for m, _ in items):
            out[f"{prefix}{name}"] = sum(m[name] * n for m, n in items) / total
    return out


def check_partial(partial: Partial, announcement: Announcement, base: Base, roster: Roster | None = None,
                  sn_id: str | None = None) -> None:
    """The proposer's checks of the partial that super node ``sn_id`` (default: the one it names) returned
    (BadRequestError naming the super node and up to three problems): for this round and from that super node;
    records only of edge nodes selected for this round that, in ``roster``, this super node listed as its own,
    each once, each for this round and base and for at most the samples the edge declared at admission, summing
    to the partial's samples; weights exactly when samples > 0, each tensor shaped as the base's."""
    sn_id = sn_id or partial.sn_id
    selected = set(announcement.participants)
    records = [r.record for r in partial.records]
    problems = []
    if partial.round != announcement.round:
        problems.append(f"partial is for round {partial.round}")
    if partial.sn_id != sn_id:
        problems.append(f"it says it comes from {partial.sn_id}")
    problems += [f"record of {r.trainer_id} is for round {r.round} / another base model" for r in records
                 if r.round != announcement.round or r.base_model_hash != base.model_hash]
    for r in records:
        listed_by, declared = (roster or {}).get(r.trainer_id, (None, None))
        if r.trainer_id not in selected or (roster is not None and listed_by != sn_id):
            problems.append(f"record of edge {r.trainer_id}, which was not selected under {sn_id} in round "
                            f"{announcement.round}")
        elif declared is not None and r.samples > declared:
            problems.append(f"record of edge {r.trainer_id} claims {r.samples} samples but declared {declared} "
                            "at admission")
        elif r.samples > MAX_SAMPLES:
            problems.append(f"record of edge {r.trainer_id} claims {r.samples} samples, more than a ledger holds")
    if len({r.trainer_id for r in records}) != len(records):
        problems.append("an edge node appears twice")
    if sum(r.samples for r in records) != partial.samples:
        problems.append(f"records sum to {sum(r.samples for r in records)} samples, the partial says {partial.samples}")
    if announcement.plan.forwards:
        if partial.weights is not None:
            problems.append("it sent an average, but this round forwards each update")
        if [u.record.record_bytes for u in partial.updates] != [r.record_bytes for r in partial.records]:
            problems.append("its forwarded updates are not one per record, in the records' order")
    elif (partial.weights is None) != (partial.samples == 0):
        problems.append("weights must come exactly when samples > 0")
    elif partial.updates:
        problems.append("it forwarded updates, but this round takes one average per super node")
    for name, array in (partial.weights or {}).items():
        ref = base.weights.get(name)
        if ref is None or array.shape != ref.shape or array.dtype != ref.dtype:
            problems.append(f"tensor {name!r} does not match the global model")
    if problems:
        raise BadRequestError(f"partial of super node {sn_id} refused: {'; '.join(problems[:3])}")


def shared_trainers(partials: Sequence[Partial]) -> list[tuple[str, str]]:
    """(super node id, reason) for each partial carrying a record of an edge node that another partial carries
    too: no trainer may count twice in a round, and the proposer cannot tell which of them is honest."""
    holders: dict[str, list[str]] = {}
    for p in partials:
        for r in p.records:
            holders.setdefault(r.record.trainer_id, []).append(p.sn_id)
    refused: dict[str, str] = {}
    for trainer, sns in holders.items():
        for sn in sns:
            other = next((o for o in sns if o != sn), None)
            if other is not None and sn not in refused:
                refused[sn] = f"partial of super node {sn} refused: edge {trainer} appears in the partial of " \
                              f"super node {other} too"
    return sorted(refused.items())


def combine_order(partials: Sequence[Partial], announcement: Announcement) -> list[Partial]:
    """The partials that carry weights, by the selection position of their first edge node."""
    position = {node_id: i for i, node_id in enumerate(announcement.participants)}
    usable = [p for p in partials if p.samples > 0 and (p.weights or p.updates)]
    return sorted(usable, key=lambda p: min(position[r.record.trainer_id] for r in p.records))


def combine(partials: Sequence[Partial], announcement: Announcement) -> Weights:
    """The announced strategy's aggregate over the partials, in ``combine_order``."""
    ordered = combine_order(partials, announcement)
    return announcement.plan.strategy().combine([(p.weights, p.samples) for p in ordered if p.weights is not None])


def combine_metrics(partials: Sequence[Partial], announcement: Announcement) -> dict[str, float]:
    """The partials' training metrics weighted by their samples, in ``combine_order``; a single partial's as is,
    so one super node reports exactly the flat figures."""
    ordered = combine_order(partials, announcement)
    if len(ordered) == 1:
        return dict(ordered[0].metrics)
    return weighted_metrics([(p.metrics, p.samples) for p in ordered])
