"""Rounds over the network: every SN trains its edge nodes into a partial aggregate; the entry (proof of authority)
combines the partials, evaluates, proposes the block and has it co-signed. Also the entry's background Train job.

The network round is the simulator's round split in two: ``fl.server.run_round`` runs on each SN over its own
edge nodes (GrpcParticipants), and the entry folds the SNs' averages weighted by their sample totals, which is
the sample-weighted average over all edge nodes (exactly the same bits with one SN, see ``combine``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import numpy as np

from chain.block import SignedBlock, SignedRecord
from chain.tensors import encode_weights, model_hash
from fl.aggregate import Accumulator
from fl.participant import FitRes
from fl.server import RoundFailed, evaluate_personalized, run_round
from fl.strategy import FedAvg
from node import serde, transport
from node.errors import BadRequestError, NetError, StaleRoundError
from node.ledger import Ledger
from node.options import DEADLINES
from node.proxy import GrpcParticipant
from node.rounds import integer_metrics
from node.context import RunContext
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import Failure as FailureMsg
from proto.fledger_pb2 import PartialHeader as PartialHeaderMsg
from proto.fledger_pb2 import PartialPart as PartialPartMsg
from proto.fledger_pb2 import RoundAnnouncement as RoundAnnouncementMsg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeRef:
    """An edge node as its SN knows it."""

    node_id: str
    address: str
    partition_index: int | None = None   # its data share; the client index of its FitIns seed

    @classmethod
    def from_entry(cls, entry) -> "EdgeRef":
        """From a MemberEntry message of role "edge" (ListEdges)."""
        info = entry.info
        return cls(info.node_id, info.address, info.partition_index if info.HasField("partition_index") else None)


def share_order(edge: EdgeRef) -> tuple:
    """The simulator's client order: by data share, then (for edges that did not say) by id."""
    return edge.partition_index is None, edge.partition_index or 0, edge.node_id


@dataclass
class Partial:
    """One SN's share of a round: the sample-weighted average of its edges' models and their signed records."""

    sn_id: str
    round: int
    samples: int                                  # total samples behind ``weights`` (0: no edge produced one)
    weights: dict[str, np.ndarray] | None
    records: list[SignedRecord] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)   # sample-weighted train_loss / train_accuracy
    timings: dict[str, float] = field(default_factory=dict)   # seconds, see _edge_timings


# ---------------------------------------------------------------- one SN's share of a round

def train_partial(sn_id: str, round: int, weights: dict[str, np.ndarray], edges: list[EdgeRef],
                  strategy: FedAvg, selected: Collection[str] | None = None) -> Partial:
    """Run ``fl.server.run_round`` over this SN's edge nodes (those in ``selected``, when the proposer chose
    clients network-wide), all in parallel; failures are data. Each edge's FitIns seed comes from its data share
    index, as the simulator's client of that index gets it."""
    ordered = sorted(edges, key=share_order)
    if selected is not None:
        wanted = set(selected)
        ordered = [e for e in ordered if e.node_id in wanted]
    if not ordered:
        return Partial(sn_id, round, 0, None, failures=[])
    participants = [GrpcParticipant(e.node_id, e.address) for e in ordered]
    index = {e.node_id: (e.partition_index if e.partition_index is not None else i) for i, e in enumerate(ordered)}
    records: list[SignedRecord] = []
    results: list[FitRes] = []

    def keep(_pid: str, res: FitRes) -> None:
        records.append(res.receipt)  # type: ignore[arg-type]  # GrpcParticipant checked it against the weights
        results.append(res)

    started = time.perf_counter()
    try:
        outcome = run_round(round, participants, weights, lambda _i, p: strategy.fit_ins(round, index[p.participant_id]),
                            max_workers=len(participants), on_result=keep)
    except RoundFailed as exc:
        return Partial(sn_id, round, 0, None, failures=exc.failures)
    finally:
        for p in participants:
            p.close()
    return Partial(sn_id, round, outcome.total_samples, outcome.weights, records, outcome.failures,
                   _weighted_metrics([(r.metrics, r.samples) for r in results], prefix="train_"),
                   _edge_timings(participants, time.perf_counter() - started))


def _edge_timings(participants: list[GrpcParticipant], sn_round_s: float) -> dict[str, float]:
    """Where one SN's share of the round went: the edges' training, the transfers around it, the SN's own tail."""
    calls = [p.last_fit for p in participants if p.last_fit is not None]
    if not calls:
        return {"sn_round_s": sn_round_s}
    train = [t for _, t in calls]
    return {"sn_round_s": sn_round_s,
            "edge_train_max_s": max(train), "edge_train_mean_s": sum(train) / len(train),
            # Fit call time minus training: both weight transfers, (de)serialisation, hashing and signing.
            "transfer_max_s": max(call - t for call, t in calls),
            # After the slowest Fit call returned: folding the last update in and finishing the average.
            "sn_aggregate_s": max(0.0, sn_round_s - max(call for call, _ in calls))}


def _weighted_metrics(items: list[tuple[Mapping[str, float], int]], prefix: str = "") -> dict[str, float]:
    total = sum(n for _, n in items) or 1
    out: dict[str, float] = {}
    for name in sorted({k for m, _ in items for k in m}):
        if all(name in m for m, _ in items):
            out[f"{prefix}{name}"] = sum(m[name] * n for m, n in items) / total
    return out


def partial_parts(partial: Partial) -> Iterator[PartialPartMsg]:
    """A partial as stream messages: header, records, weight chunks."""
    yield PartialPartMsg(header=PartialHeaderMsg(
        round=partial.round, sn_id=partial.sn_id, samples=partial.samples,
        failures=[FailureMsg(node_id=n, reason=r) for n, r in partial.failures],
        metrics=serde.metrics_to_msg(partial.metrics), timings=serde.metrics_to_msg(partial.timings)))
    for record in partial.records:
        yield PartialPartMsg(record=serde.record_to_msg(record))
    if partial.weights is not None:
        for chunk in transport.send_weights(partial.weights):
            yield PartialPartMsg(weights=chunk)


def read_partial(parts: Iterable[PartialPartMsg], round: int, base: Mapping[str, np.ndarray]) -> Partial:
    """Reassemble a partial and check it: records signed, for this round and base, summing to its samples."""
    parts = iter(parts)
    first = next(parts, None)
    if first is None or first.WhichOneof("part") != "header":
        raise BadRequestError("a partial must start with its header")
    head = first.header
    records, assembler = [], transport.WeightsAssembler()
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "record":
            records.append(serde.record_from_msg(part.record))
        elif kind == "weights":
            assembler.add(part.weights)
        else:
            raise BadRequestError(f"unexpected {kind!r} message inside a partial")
    weights = assembler.finish()[0] if assembler.started else None
    base_hash = model_hash(base)
    recs = [r.record for r in records]
    problems = [f"record of {r.trainer_id} is for round {r.round} / another base model" for r in recs
                if r.round != round or r.base_model_hash != base_hash]
    if head.round != round:
        problems.append(f"partial is for round {head.round}")
    if len({r.trainer_id for r in recs}) != len(recs):
        problems.append("a trainer appears twice")
    if sum(r.samples for r in recs) != head.samples:
        problems.append(f"records sum to {sum(r.samples for r in recs)} samples, header says {head.samples}")
    if (weights is None) != (head.samples == 0):
        problems.append("weights must come exactly when samples > 0")
    for name, array in (weights or {}).items():
        ref = base.get(name)
        if ref is None or array.shape != ref.shape or array.dtype != ref.dtype:
            problems.append(f"tensor {name!r} does not match the global model")
    if problems:
        raise BadRequestError(f"partial of {head.sn_id} refused: {'; '.join(problems[:3])}")
    return Partial(head.sn_id, round, int(head.samples), weights, records,
                   [(f.node_id, f.reason) for f in head.failures], serde.metrics_from_msg(head.metrics),
                   serde.metrics_from_msg(head.timings))


def combine(partials: list[Partial]) -> dict[str, np.ndarray]:
    """Sample-weighted average of the partial averages = the average over all their edges.

    A single partial is taken as is: re-weighting a float32 average by its own total would round it again.
    """
    usable = sorted((p for p in partials if p.samples > 0 and p.weights), key=lambda p: p.sn_id)
    if len(usable) == 1:
        return dict(usable[0].weights)  # type: ignore[arg-type]
    acc = Accumulator()
    for p in usable:
        acc.add(p.weights, p.samples)  # type: ignore[arg-type]
    return acc.result()


# ---------------------------------------------------------------- the entry's round

@dataclass(frozen=True)
class RoundReport:
    round: int
    block: SignedBlock
    metrics: dict[str, float]
    participants: int
    failures: list[tuple[str, str]]
    timings: dict[str, float] = field(default_factory=dict)   # seconds; see Coordinator.run_round


LocalPartial = Callable[[int, int, str, "Collection[str] | None"], Partial]


class Coordinator:
    """Runs rounds from the entry: select, announce, collect partials, combine, evaluate, propose, co-sign, commit."""

    def __init__(self, ledger: Ledger, ctx: RunContext, local: LocalPartial,
                 peers: Callable[[], list[tuple[str, str]]], all_edges: Callable[[], list[EdgeRef]],
                 commit: Callable[..., object]):
        self.ledger, self.ctx = ledger, ctx
        self.local = local            # (round, base_height, base_hash, selected ids) -> this SN's partial
        self.peers = peers            # the other live SNs: (node id, address)
        self.all_edges = all_edges    # every edge node of every live SN
        self.commit = commit          # consensus.propose_and_commit to the peers; raises NoMajorityError

    def genesis(self) -> SignedBlock:
        """The round-0 block from the seeded initial model, as the simulator writes it."""
        weights = self.ctx.genesis_weights()
        metrics = self.ctx.evaluate_global(weights)
        block, durable = self.ledger.propose(round=0, algorithm=self.ctx.strategy.name, params=self.ctx.params(),
                                             weights=weights, records=[], metrics=integer_metrics(metrics),
                                             timestamp_ms=self.ctx.timestamp(0))
        durable.result()
        log.info("genesis block %s (model %s)", block.hash[:16], block.header.model_hash[:16])
        return block

    def select(self, round: int) -> list[EdgeRef]:
        """The round's trainers over the whole network, as the simulator picks them: every live edge node in data
        share order, then fraction C of them with the run's seeded RNG."""
        edges = sorted(self.all_edges(), key=share_order)
        if not edges:
            raise RoundFailed(round, [("network", "no live edge node is registered with any super node")])
        chosen = set(self.ctx.strategy.select(round, [e.node_id for e in edges]))
        return [e for e in edges if e.node_id in chosen]

    def run_round(self, round: int) -> RoundReport:
        """One round; the report's timings say where its wall time went (seconds):

        select_s (listing edges), partials_s (announce until every SN's partial arrived: the edges' training and
        transfers, the SNs' aggregation and the partials' transfer), combine_s, evaluate_s (global and
        personalised evaluation), block_s (build and sign), cosign_s (peers verify and co-sign), store_s (the
        proposer's durable write), commit_s (peers store), round_s (all), plus the slowest SN's own figures
        (edge_train_max_s, edge_train_mean_s, transfer_max_s, sn_aggregate_s, sn_round_s).
        """
        started = time.perf_counter()
        tip = self.ledger.tip
        if tip is None:
            raise StaleRoundError("the chain has no genesis block yet")
        if round <= tip.header.round:
            raise StaleRoundError(f"round {round} is stale: the head block closed round {tip.header.round}")
        self.ledger.flush()
        base = self.ledger.load_weights(tip.header.height)
        base_height, base_hash = tip.header.height, tip.header.model_hash
        peers = self.peers()
        selected = [e.node_id for e in self.select(round)]
        timings = {"select_s": time.perf_counter() - started}
        mark = time.perf_counter()
        ann = RoundAnnouncementMsg(round=round, base_height=base_height, base_model_hash=base_hash,
                                   proposer_id=self.ledger.key.node_id, participants=selected)
        with ThreadPoolExecutor(max_workers=len(peers) + 1, thread_name_prefix="round") as pool:
            jobs = {self.ledger.key.node_id: pool.submit(self.local, round, base_height, base_hash, selected)}
            for node_id, address in peers:
                jobs[node_id] = pool.submit(_remote_partial, address, ann, base)
            partials, failures = [], []
            for sn_id, job in sorted(jobs.items()):
                try:
                    partials.append(job.result())
                except (grpc.RpcError, NetError, OSError) as exc:
                    why = transport.rpc_error_text(exc) if isinstance(exc, grpc.RpcError) else str(exc)
                    failures.append((sn_id, f"super node failed: {why}"))
                    log.warning("round %d: super node %s failed: %s", round, sn_id, why)
        timings["partials_s"] = time.perf_counter() - mark
        for p in partials:
            failures.extend(p.failures)
        accounted = {r.record.trainer_id for p in partials for r in p.records} | {node_id for node_id, _ in failures}
        failures += [(node_id, "selected, but no live super node had it to train (it left before the round)")
                     for node_id in selected if node_id not in accounted]
        if not any(p.samples > 0 for p in partials):
            raise RoundFailed(round, failures)
        slowest = max(partials, key=lambda p: p.timings.get("sn_round_s", 0.0))
        timings.update(slowest.timings)
        mark = time.perf_counter()
        new = {**base, **combine(partials)}
        records = sorted((r for p in partials for r in p.records), key=lambda r: r.record.trainer_id)
        timings["combine_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        metrics = _weighted_metrics([(p.metrics, p.samples) for p in partials if p.samples > 0])
        metrics.update(self.ctx.evaluate_global(new))
        if self.ctx.personalised:
            edges = [GrpcParticipant(e.node_id, e.address) for e in self.all_edges()]
            try:
                pers = evaluate_personalized(edges, new)
            finally:
                for e in edges:
                    e.close()
            metrics.update({f"personal_accuracy_{k}": v for k, v in pers.items() if k != "count"})
        timings["evaluate_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        block = self.ledger.build(round=round, algorithm=self.ctx.strategy.name, params=self.ctx.params(),
                                  weights=new, records=records, metrics=integer_metrics(metrics),
                                  timestamp_ms=self.ctx.timestamp(round))
        blob = encode_weights(new)
        timings["block_s"] = time.perf_counter() - mark
        self.commit([address for _, address in peers], block, records, blob, timings)
        timings["round_s"] = time.perf_counter() - started
        log.info("round %d: block %d %s, %d updates, %d failures, %.2f s", round, block.header.height,
                 block.hash[:12], len(records), len(failures), timings["round_s"])
        return RoundReport(round, block, metrics, len(records), failures, timings)


def _remote_partial(address: str, ann: RoundAnnouncementMsg, base: Mapping[str, np.ndarray]) -> Partial:
    with transport.open_channel(address) as channel:
        parts = fledger_pb2_grpc.SuperNodeStub(channel).AnnounceRound(ann, timeout=DEADLINES.round)
        return read_partial(parts, ann.round, base)
