"""What the operator sees of a super node (status, members, evaluation, blocks), and what the console asks of it:
plain values that the wire layer converts, so neither side handles protobuf messages."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from chain.block import SignedBlock, SignedRecord
from chain.verify import VerifyReport
from node.engine.types import ChainHead, MembershipResult, Progress

if TYPE_CHECKING:   # the console reads these views without loading the round engine (and torch)
    from node.engine.jobs import TrainJob


@dataclass(frozen=True)
class MemberView:
    """One node as getSN() lists it."""

    node_id: str
    public_key: str
    address: str
    role: str                    # "entry", "supernode" or "edge"
    alive: bool
    silent_s: float = 0.0        # seconds since it was last heard from
    parent_id: str = ""          # edge: its super node
    load: int = 0                # super node: its live edge nodes
    capacity: int = 0            # super node: most edge nodes it takes (0: no limit)
    samples: int = 0             # edge: its training samples
    share: int | None = None     # edge: its data-share index
    unreachable: str = ""        # super node: why it did not answer getSN() in time ("" when it did)


@dataclass(frozen=True)
class NodeStatus:
    node_id: str
    role: str
    head: ChainHead | None
    edges: int
    supernodes: int
    training: bool
    paused: bool
    round: int                   # the round being trained, else the head block's round
    validators: tuple[str, ...] = ()   # node ids of the validator set at the head, sorted
    view: int = 0                # the view this node follows, and its proposer (node.engine.election)
    proposer: str = ""
    ledger_error: str = ""       # why its ledger cannot write now ("" while it can); the head is the durable one


@dataclass(frozen=True)
class EdgeEval:
    node_id: str
    loss: float = 0.0
    accuracy: float = 0.0
    samples: int = 0
    error: str = ""              # set when the edge node could not be evaluated


@dataclass(frozen=True)
class EvalReport:
    """The head model on the global test set (samples 0: none, e.g. FedPer) and on each edge node's split."""

    loss: float = 0.0
    accuracy: float = 0.0
    samples: int = 0
    edges: list[EdgeEval] = field(default_factory=list)
    edge_accuracy_mean: float = 0.0
    edge_accuracy_min: float = 0.0
    edge_accuracy_max: float = 0.0


@dataclass(frozen=True)
class BlockView:
    block: SignedBlock
    records: list[SignedRecord]


class AdminBackend(Protocol):
    """What the Admin service asks of a super node."""

    def status(self) -> NodeStatus: ...

    def start_training(self, rounds: int) -> tuple[TrainJob, bool]:
        """(job, True) when it started, (the running job, False) when one was running; PreconditionError when
        this node does not train."""
        ...

    def follow(self, job: TrainJob, alive: Callable[[], bool]) -> Iterator[Progress]: ...

    def pause(self) -> None: ...

    def save_model(self, path: str | None) -> tuple[Path, str]: ...

    def evaluate(self) -> EvalReport: ...

    def network_view(self) -> list[MemberView]: ...

    def block(self, height: int) -> BlockView: ...

    def verify_chain(self) -> VerifyReport: ...

    def tokens(self) -> dict[str, str]:
        """The entry's current join tokens by role ("supernode", "edge"); secure mode only."""
        ...

    def rotate_token(self, role: str) -> dict[str, str]:
        """Revoke ``role``'s join token and issue a new one; the current tokens."""
        ...

    def remove_supernode(self, node_id: str) -> MembershipResult:
        """Propose a membership block removing validator ``node_id`` (the entry only; NoMajorityError when too few
        validators co-sign it, NotFoundError when it is not a validator, PreconditionError for the entry itself)."""
        ...
