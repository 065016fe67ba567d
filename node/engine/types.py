"""The round engine's vocabulary: edge references, the base model, announcements, partials, reports, and the two
seams (an edge directory for participants, and Peer for super nodes), each with an in-process and a gRPC side."""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from chain.block import Cosignature, SignedBlock, SignedRecord
from chain.tensors import encode_weights, model_hash
from chain.updates import RecordedUpdate
from chain.verify import VerifiedBlock
from fl.aggregate import Weights
from fl.participant import Participant
from fl.strategy import FedAvg, make_strategy

SIM = "sim"            # the block params key holding a scenario round's simulated time and dropped edge nodes
MAX_DROPPED = 1000     # the most dropped edge nodes a block lists


@dataclass(frozen=True)
class EdgeRef:
    """An edge node as the network knows it: its id, where it serves, and its data share."""

    node_id: str
    address: str                  # host:port; "" for an in-process edge node
    share: int | None = None      # its data-share index (client index); None when it did not say
    samples: int | None = None    # training samples it declared when admitted, the most an update of it may
                                  # claim; None: not declared (an in-process edge the caller vouches for)


def share_order(edge: EdgeRef) -> tuple[bool, int, str]:
    """The order of edge nodes everywhere in a round: by data share, then (for edges that did not say) by id."""
    return edge.share is None, edge.share or 0, edge.node_id


class Base:
    """A model a round sends out: the weights at ``height`` (the round's base, or the new model for evaluation),
    with their hash and encoding, each computed at most once, when first asked for, and shared by every transfer."""

    def __init__(self, height: int, model_hash: str | None, weights: Weights, blob: bytes | None = None):
        self.height = height
        self.weights = weights
        self._hash = model_hash
        self._blob = blob
        self._lock = threading.Lock()

    @property
    def model_hash(self) -> str:
        with self._lock:
            if self._hash is None:
                self._hash = model_hash(self.weights)
            return self._hash

    @property
    def blob(self) -> bytes:
        with self._lock:
            if self._blob is None:
                self._blob = encode_weights(self.weights)
            return self._blob


@dataclass(frozen=True)
class Plan:
    """The round's training instructions, chosen by the proposer and carried by the announcement: every super node
    trains with these, never with its own configuration's values."""

    algorithm: str
    lr: float
    local_epochs: int
    batch_size: int
    momentum: float
    seed: int
    aggregate: str = "fedavg"     # the aggregation rule (fl.robust spec)
    record_updates: bool = False  # every update is stored with its block

    @classmethod
    def of(cls, strategy: FedAvg, aggregate: str = "fedavg", record_updates: bool = False) -> Plan:
        return cls(strategy.name, strategy.lr, strategy.local_epochs, strategy.batch_size, strategy.momentum,
                   strategy.seed, aggregate, record_updates)

    @property
    def forwards(self) -> bool:
        """Whether super nodes forward each edge node's update to the proposer instead of their partial average:
        a robust rule must see every update (a median of medians is not a median), and recorded updates are
        stored whole. Plain FedAvg without recording sends one average per super node, which is exact."""
        return self.aggregate != "fedavg" or self.record_updates

    def strategy(self) -> FedAvg:
        """The strategy that gives each selected edge its FitIns and aggregates the results."""
        return make_strategy(self.algorithm, lr=self.lr, local_epochs=self.local_epochs,
                             batch_size=self.batch_size, momentum=self.momentum, seed=self.seed)


@dataclass(frozen=True)
class Announcement:
    """The proposer's call for a round."""

    round: int
    base_height: int
    base_model_hash: str
    proposer_id: str
    participants: tuple[str, ...]   # the selected edge nodes of the whole network, in share order
    plan: Plan
    view: int = 0                   # the proposer's view (node.engine.election)
    target_round: int = 0           # the training job's last round, so any validator can continue it


@dataclass(frozen=True)
class Update:
    """One edge node's update as its super node forwards it (``Plan.forwards``): the signed record and the weights,
    which the proposer checks against the record's update hash before anything else."""

    record: SignedRecord
    weights: Weights


@dataclass
class Partial:
    """One super node's share of a round: its strategy's aggregate of its edges' models and their signed records;
    when the plan forwards, ``weights`` is None and ``updates`` holds every edge's update (one per record)."""

    sn_id: str
    round: int
    samples: int                                  # total samples behind ``weights`` (0: no edge produced one)
    weights: Weights | None
    records: list[SignedRecord] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)   # sample-weighted train_loss / train_accuracy
    timings: dict[str, float] = field(default_factory=dict)   # seconds, see partial.edge_timings
    updates: list[Update] = field(default_factory=list)       # forwarded updates, in selection order


@dataclass(frozen=True)
class MembershipResult:
    """A membership block that changed the validator set (Coordinator.change_validators)."""

    height: int
    hash: str
    validators: tuple[str, ...]   # node ids of the validator set after it, sorted


@dataclass(frozen=True)
class EdgeTiming:
    """One selected edge node's round: its phases in simulated seconds from the round's start, and its fate."""

    edge: str
    index: int
    sn: str
    status: str               # "trained" | "dropped"
    reason: str | None
    down_s: float
    compute_s: float
    up_s: float
    finish_s: float           # relative to the round's start (arrival of the announcement included)

    def row(self) -> dict[str, Any]:
        return {"edge": self.edge, "index": self.index, "sn": self.sn, "status": self.status, "reason": self.reason,
                "down_s": round(self.down_s, 4), "compute_s": round(self.compute_s, 4), "up_s": round(self.up_s, 4),
                "finish_s": round(self.finish_s, 4)}


@dataclass
class RoundPlan:
    round: int
    start_s: float                       # the virtual clock when the round starts
    round_s: float                       # its simulated duration
    kept: list[str]                      # edge nodes that train, in share order
    timings: list[EdgeTiming]            # every selected edge node, in share order
    available: int                       # edge nodes online at the round's start
    deadline_s: float | None
    phases: dict[str, float] = field(default_factory=dict)   # partials_s, cosign_s, commit_s

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return [(t.edge, t.reason or "dropped") for t in self.timings if t.status == "dropped"]

    @property
    def end_s(self) -> float:
        return self.start_s + self.round_s

    def params(self) -> dict[str, Any]:
        """What the block records: integer milliseconds (no floats in a header) and who was dropped and why."""
        return {"round_ms": round(self.round_s * 1000), "clock_ms": round(self.end_s * 1000),
                "dropped": [[edge, why] for edge, why in self.dropped[:MAX_DROPPED]]}

    def row(self) -> dict[str, Any]:
        return {"round": self.round, "start_s": round(self.start_s, 4), "round_s": round(self.round_s, 4),
                "deadline_s": self.deadline_s, "available": self.available,
                "edges": [t.row() for t in self.timings]}


@dataclass(frozen=True)
class RoundReport:
    """A finished round: its final block, metrics, how many updates it used, and what failed (data, not errors)."""

    round: int
    block: SignedBlock
    metrics: dict[str, float]
    participants: int
    failures: list[tuple[str, str]]
    timings: dict[str, float] = field(default_factory=dict)   # seconds; see Coordinator.run_round
    excluded: list[tuple[str, str]] = field(default_factory=list)   # (edge id, why): updates that arrived but
                                                                    # were refused or left out by the rule
    dropped: list[tuple[str, str]] = field(default_factory=list)    # (edge id, why): selected under a scenario
                                                                    # but not trained (offline, late, not first K)
    sim: RoundPlan | None = None   # the round on the virtual clock (a scenario's runs only)


@dataclass(frozen=True)
class Note:
    """A line about training that is not a finished round: paused, nothing to do, a failed round."""

    round: int
    message: str
    error: bool = False   # training stopped on an error (a console following it exits non-zero)


Progress = RoundReport | Note   # what a training job reports, round by round


@dataclass(frozen=True)
class BlockData:
    """A block with everything it carries, as it travels between super nodes (not verified by the receiver yet)."""

    block: SignedBlock
    records: tuple[SignedRecord, ...]
    weights_blob: bytes
    cosignatures: tuple[Cosignature, ...] = ()
    updates: tuple[RecordedUpdate, ...] = ()   # the round's recorded updates (--record-updates), in order

    @classmethod
    def of(cls, verified: VerifiedBlock) -> BlockData:
        return cls(verified.block, tuple(verified.records), verified.weights_blob, tuple(verified.cosignatures),
                   tuple(verified.updates))


@dataclass(frozen=True)
class ChainHead:
    """A super node's head as a peer reports it."""

    height: int
    hash: str
    model_hash: str


@dataclass(frozen=True)
class Promise:
    """A validator's answer to a candidate proposer (node.engine.election): the view it now follows, its head, its
    prepared block and the training job's last round as it last heard it."""

    view: int
    head: ChainHead | None
    prepared: tuple[int, str, int] | None   # (height, hash, view) of its prepared block
    target_round: int


class EdgeDirectory(Protocol):
    """One super node's edge nodes, and how to reach one as a participant of a round."""

    concurrency: int   # how many edge nodes may fit at once (gRPC: all; in-process: one, they share a model)

    def edges(self) -> list[EdgeRef]:
        """The live edge nodes."""
        ...

    def connect(self, edge: EdgeRef, base: Base) -> Participant:
        """A participant for ``edge`` that trains from (or evaluates) ``base``. Close it with ``release``."""
        ...

    def release(self, participant: Participant) -> None: ...


class Peer(Protocol):
    """A super node as the proposer and syncing nodes see it, in-process or over gRPC. Each call raises a NetError
    subclass (or OSError) when the peer refuses or cannot be reached."""

    node_id: str

    def edges(self) -> list[EdgeRef]:
        """Its live edge nodes."""
        ...

    def train(self, announcement: Announcement, base: Base) -> Partial:
        """Train its selected edge nodes from the announced base and return its partial aggregate (``base`` is the
        proposer's copy, used to check the partial; the peer trains from its own ledger)."""
        ...

    def cosign(self, data: BlockData, view: int = 0, sender: str = "") -> Cosignature:
        """Verify the proposed block from validator ``sender`` against its head, prepare it durably in ``view`` and
        co-sign it; the block waits there for commit."""
        ...

    def promise(self, view: int, candidate: str) -> Promise:
        """Follow ``view`` of candidate proposer ``candidate``; its head, prepared block and training target."""
        ...

    def prepared_block(self) -> BlockData | None:
        """The block it holds prepared (None: none)."""
        ...

    def commit(self, height: int, block_hash: str, cosignatures: Sequence[Cosignature]) -> None:
        """Store the co-signed block durably; returns once it is durable there."""
        ...

    def head(self) -> ChainHead | None: ...

    def blocks(self, start: int, end: int) -> Iterator[BlockData]:
        """Blocks ``start``..``end`` inclusive, with records, co-signatures and models."""
        ...
