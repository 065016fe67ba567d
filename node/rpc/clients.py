"""gRPC clients that present the engine's seams: GrpcParticipant (an edge node), GrpcPeer (a super node), the
edge directories of a super node, and the registry and admin clients. Every call has a deadline; gRPC failures
become the engine's errors."""
from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TypeVar

import grpc
import numpy as np

from chain.block import Cosignature
from chain.keys import NodeKey
from fl.participant import EvalRes, FitIns, FitRes, Participant
from node.engine.election import SupersededError
from node.engine.errors import (
    BadRequestError,
    ForbiddenError,
    NetError,
    NoCapacityError,
    NotFoundError,
    PreconditionError,
    TakenIdError,
    UnauthenticatedError,
    UnavailableError,
)
from node.engine.membership import Membership
from node.engine.types import (
    Announcement,
    Base,
    BlockData,
    ChainHead,
    EdgeRef,
    MembershipResult,
    Partial,
    Progress,
    Promise,
)
from node.engine.views import BlockView, EvalReport, MemberView, NodeStatus
from node.rpc import serde, transport
from node.rpc.options import DEADLINES, TRANSFER_SLACK_BYTES, Deadlines
from node.security.pki import TlsCredentials, new_tls_key
from node.security.tokens import JoinToken, accept_reply, make_request
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import CommitRequest as CommitRequestMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import FitRequest as FitRequestMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import Height as HeightMsg
from proto.fledger_pb2 import HeightRange as HeightRangeMsg
from proto.fledger_pb2 import ListRequest as ListRequestMsg
from proto.fledger_pb2 import PromiseRequest as PromiseRequestMsg
from proto.fledger_pb2 import RemoveRequest as RemoveRequestMsg
from proto.fledger_pb2 import RotateRequest as RotateRequestMsg
from proto.fledger_pb2 import SaveRequest as SaveRequestMsg
from proto.fledger_pb2 import TrainProgress as TrainProgressMsg
from proto.fledger_pb2 import TrainRequest as TrainRequestMsg

T = TypeVar("T")
S = TypeVar("S")

# Status code of a peer's answer -> the engine error it stands for (anything else: UnavailableError).
ERROR_FOR: dict[grpc.StatusCode, type[NetError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: TakenIdError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacityError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: ForbiddenError,
}


def as_net_error(exc: grpc.RpcError, who: str) -> NetError:
    """A failed call as the engine error its status code stands for, its message naming the peer."""
    code = exc.code() if hasattr(exc, "code") else None
    kind = ERROR_FOR.get(code, UnavailableError) if code is not None else UnavailableError
    details = exc.details() if hasattr(exc, "details") else str(exc)
    view = SupersededError.view_in(details or "") if kind is PreconditionError else None
    error = SupersededError(f"{who}: {transport.rpc_error_text(exc)}", view) if view is not None \
        else kind(f"{who}: {transport.rpc_error_text(exc)}")
    error.status = code.name if code is not None else "UNKNOWN"
    error.details = exc.details() if hasattr(exc, "details") else str(exc)
    return error


def call(address: str, stub_type: Callable[[grpc.Channel], S], fn: Callable[[S], T], who: str,
         security: TlsCredentials | None = None) -> T:
    """``fn(stub)`` on a fresh channel to ``address`` (mutual TLS with ``security``); a failed call raises the
    engine error its status code stands for, naming ``who``."""
    try:
        with transport.open_channel(address, security) as channel:
            return fn(stub_type(channel))
    except grpc.RpcError as exc:
        raise as_net_error(exc, who) from exc


def join_network(join_address: str, token: JoinToken, key: NodeKey, hosts: Sequence[str],
                 deadlines: Deadlines = DEADLINES) -> TlsCredentials:
    """Join a secure network with ``token`` at the entry's join port: a fresh TLS key, and a certificate for it
    naming this node's ledger key, issued by the CA the token pins. Raises NetError when the entry refuses or
    cannot be reached, PkiError when its answer does not prove it holds the token and the pinned CA."""
    tls_key, tls_public = new_tls_key()
    request = make_request(token, key, tls_public, hosts)
    reply = call(join_address, fledger_pb2_grpc.EnrollmentStub,
                 lambda stub: stub.Join(serde.join_request_to_msg(request), timeout=deadlines.register),
                 f"the entry's join port {join_address}")
    accept_reply(token, request, bytes(reply.ca_certificate), bytes(reply.certificate), bytes(reply.mac))
    return TlsCredentials(tls_key, bytes(reply.certificate), bytes(reply.ca_certificate))


def is_edge_node(address: str, timeout: float, security: TlsCredentials | None = None) -> bool:
    """The address serves the EdgeNode service."""
    try:
        with transport.open_channel(address, security) as channel:
            fledger_pb2_grpc.EdgeNodeStub(channel).Info(EmptyMsg(), timeout=timeout)
    except grpc.RpcError:
        return False
    return True


class RemoteError(RuntimeError):
    """A remote edge node failed or answered something unusable; the round records it as that edge's failure."""


class GrpcParticipant:
    """One edge node through gRPC. It sends the round's base (encoded once per round, shared by every edge) and
    checks the returned update against the hash its record signs; FitRes.receipt is that checked record."""

    def __init__(self, participant_id: str, address: str, base: Base, deadlines: Deadlines = DEADLINES,
                 security: TlsCredentials | None = None):
        self.participant_id = participant_id   # the edge's node id; its records must be signed by that id
        self.address = address
        self.security = security
        self.base = base
        self.deadlines = deadlines
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self.last_fit: tuple[float, float] | None = None   # (Fit call seconds, of which the edge trained), last fit

    @property
    def stub(self) -> fledger_pb2_grpc.EdgeNodeStub:
        with self._lock:
            if self._channel is None:
                self._channel = transport.open_channel(self.address, self.security)
            return fledger_pb2_grpc.EdgeNodeStub(self._channel)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        """Train the edge from this round's base (``weights`` must be the base's weights)."""
        base = self.base
        if weights.keys() != base.weights.keys():
            raise ValueError("a remote edge node trains only from the round's base model it was connected with")

        def requests() -> Iterator[FitRequestMsg]:
            yield FitRequestMsg(ins=serde.fit_ins_to_msg(ins))
            for chunk in transport.blob_chunks(base.blob, base.model_hash):
                yield FitRequestMsg(weights=chunk)

        started = time.perf_counter()
        try:
            replies = self.stub.Fit(requests(), timeout=self.deadlines.fit)
            first = next(replies, None)
            if first is None or first.WhichOneof("part") != "summary":
                raise RemoteError(f"{self.participant_id}: Fit reply did not start with a summary")
            summary = first.summary
            record = serde.record_from_msg(summary.record)
            metrics = serde.metrics_from_msg(summary.metrics)
            # An update is never bigger than the model it was trained from.
            got, update_hash = transport.receive_weights((r.weights for r in replies
                                                          if r.WhichOneof("part") == "weights"),
                                                         len(base.blob) + TRANSFER_SLACK_BYTES)
        except grpc.RpcError as exc:
            raise RemoteError(f"{self.participant_id} at {self.address}: {transport.rpc_error_text(exc)}") from exc
        except BadRequestError as exc:
            raise RemoteError(f"{self.participant_id} sent a bad answer: {exc}") from exc
        if not hmac.compare_digest(record.record.update_hash, update_hash):
            raise RemoteError(f"{self.participant_id}: update record rejected: its update_hash is not the hash of "
                              "the weights received")
        self.last_fit = (time.perf_counter() - started, max(0.0, summary.train_s))
        return FitRes(weights=got, samples=int(summary.samples), metrics=metrics, receipt=record)

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        """Evaluate the model it was connected with (``weights`` must be that model's)."""
        if weights.keys() != self.base.weights.keys():
            raise ValueError("a remote edge node evaluates only the model it was connected with")
        chunks = transport.blob_chunks(self.base.blob, self.base.model_hash)
        try:
            reply = self.stub.Evaluate(chunks, timeout=self.deadlines.evaluate)
        except grpc.RpcError as exc:
            raise RemoteError(f"{self.participant_id} at {self.address}: {transport.rpc_error_text(exc)}") from exc
        return serde.eval_from_msg(reply)


class RemoteEdges:
    """A super node's edge nodes as its membership table lists them, reached over gRPC."""

    concurrency = 0   # all at once: each trains in its own process

    def __init__(self, table: Membership, security: TlsCredentials | None = None, deadlines: Deadlines = DEADLINES):
        self.table = table
        self.security = security
        self.deadlines = deadlines   # fit and evaluate: a frozen edge node stalls a round at most this long

    def edges(self) -> list[EdgeRef]:
        return [EdgeRef(m.node_id, m.address, m.share, m.samples) for m in self.table.members()]

    def connect(self, edge: EdgeRef, base: Base) -> Participant:
        return GrpcParticipant(edge.node_id, edge.address, base, self.deadlines, security=self.security)

    def release(self, participant: Participant) -> None:
        if isinstance(participant, GrpcParticipant):
            participant.close()


class AnyEdges(RemoteEdges):
    """Any edge node of the network by its address (the proposer's personalised evaluation)."""

    def __init__(self, security: TlsCredentials | None = None, deadlines: Deadlines = DEADLINES) -> None:
        super().__init__(Membership(kind="edge node"), security, deadlines)


class GrpcPeer:
    """Another super node through its SuperNode service: the engine's Peer."""

    def __init__(self, node_id: str, address: str, deadlines: Deadlines = DEADLINES,
                 security: TlsCredentials | None = None):
        self.node_id = node_id
        self.address = address
        self.deadlines = deadlines
        self.security = security

    def _call(self, fn: Callable[[fledger_pb2_grpc.SuperNodeStub], T]) -> T:
        return call(self.address, fledger_pb2_grpc.SuperNodeStub, fn,
                    f"super node {self.node_id[:12]} at {self.address}", self.security)

    def edges(self) -> list[EdgeRef]:
        listed = self._call(lambda stub: stub.ListEdges(ListRequestMsg(), timeout=self.deadlines.query))
        return [serde.edge_ref_from_msg(m) for m in listed.members
                if m.alive and m.parent_id == self.node_id]

    def members(self, include_dead: bool) -> list[MemberView]:
        listed = self._call(lambda stub: stub.ListEdges(ListRequestMsg(include_dead=include_dead),
                                                        timeout=self.deadlines.query))
        return [serde.view_from_msg(m) for m in listed.members]

    def train(self, announcement: Announcement, base: Base) -> Partial:
        msg = serde.announcement_to_msg(announcement)
        max_bytes = len(base.blob) + TRANSFER_SLACK_BYTES   # a partial aggregate is never bigger than its base
        return self._call(lambda stub: serde.read_partial(
            stub.AnnounceRound(msg, timeout=self.deadlines.round), max_bytes))

    def cosign(self, data: BlockData, view: int = 0, sender: str = "") -> Cosignature:
        reply = self._call(lambda stub: stub.ProposeBlock(serde.proposal_parts(data, view, sender),
                                                          timeout=self.deadlines.block))
        return serde.cosig_from_msg(reply)

    def commit(self, height: int, block_hash: str, cosignatures: Sequence[Cosignature]) -> None:
        request = CommitRequestMsg(height=height, hash=block_hash,
                                   cosignatures=[serde.cosig_to_msg(c) for c in cosignatures])
        self._call(lambda stub: stub.CommitBlock(request, timeout=self.deadlines.commit))

    def promise(self, view: int, candidate: str) -> Promise:
        request = PromiseRequestMsg(view=view, candidate_id=candidate)
        return serde.promise_from_msg(self._call(lambda stub: stub.Promise(request, timeout=self.deadlines.query)))

    def prepared_block(self) -> BlockData | None:
        blocks = self._call(lambda stub: list(serde.read_blocks(stub.GetPrepared(EmptyMsg(),
                                                                                 timeout=self.deadlines.block))))
        return blocks[0] if blocks else None

    def head(self) -> ChainHead | None:
        return serde.head_from_msg(self._call(
            lambda stub: stub.GetHead(EmptyMsg(), timeout=self.deadlines.query)))

    def blocks(self, start: int, end: int) -> Iterator[BlockData]:
        try:
            with transport.open_channel(self.address, self.security) as channel:
                stream = fledger_pb2_grpc.SuperNodeStub(channel).GetBlocks(
                    HeightRangeMsg(from_height=start, to_height=end), timeout=self.deadlines.sync)
                yield from serde.read_blocks(stream)
        except grpc.RpcError as exc:
            raise as_net_error(exc, f"super node {self.node_id[:12]} at {self.address}") from exc


class RegistryClient:
    """A node's calls to the entry's Registry and to its own super node's membership table."""

    def __init__(self, entry: str, deadlines: Deadlines = DEADLINES, security: TlsCredentials | None = None):
        self.entry = entry
        self.deadlines = deadlines
        self.security = security

    def _registry(self, fn: Callable[[fledger_pb2_grpc.RegistryStub], T]) -> T:
        return call(self.entry, fledger_pb2_grpc.RegistryStub, fn, f"entry {self.entry}", self.security)

    def register_supernode(self, info: MemberView) -> None:
        msg = serde.view_to_msg(info).info
        self._registry(lambda stub: stub.RegisterSuperNode(msg, timeout=self.deadlines.register))

    def heartbeat(self, node_id: str, load: int) -> None:
        self._registry(lambda stub: stub.Heartbeat(HeartbeatRequestMsg(node_id=node_id, load=load),
                                                   timeout=self.deadlines.heartbeat))

    def supernodes(self, include_dead: bool = False) -> list[MemberView]:
        listed = self._registry(lambda stub: stub.ListSuperNodes(ListRequestMsg(include_dead=include_dead),
                                                                 timeout=self.deadlines.query))
        return [serde.view_from_msg(m) for m in listed.members]

    def assign(self, info: MemberView) -> MemberView:
        msg = serde.view_to_msg(info).info
        return serde.view_from_msg(self._registry(
            lambda stub: stub.AssignSuperNode(msg, timeout=self.deadlines.register)))

    def register_edge(self, supernode: str, info: MemberView) -> float:
        """Register an edge node with a super node; returns the heartbeat interval it asks for (0: keep yours)."""
        msg = serde.view_to_msg(info).info
        reply = call(supernode, fledger_pb2_grpc.SuperNodeStub,
                     lambda stub: stub.RegisterEdge(msg, timeout=self.deadlines.register), f"super node at {supernode}",
                     self.security)
        return float(reply.heartbeat_interval_s)

    def edge_heartbeat(self, supernode: str, node_id: str) -> None:
        call(supernode, fledger_pb2_grpc.SuperNodeStub,
             lambda stub: stub.EdgeHeartbeat(HeartbeatRequestMsg(node_id=node_id), timeout=self.deadlines.heartbeat),
             f"super node at {supernode}", self.security)


class AdminClient:
    """The console's and the cluster command's view of one super node's Admin service. A failed call raises the
    engine error its status code stands for, its message "CODE: details" (UnavailableError when unreachable)."""

    def __init__(self, address: str, deadlines: Deadlines = DEADLINES, security: TlsCredentials | None = None):
        self.address = address
        self.deadlines = deadlines
        self.security = security
        self._channel = transport.open_channel(address, security)
        self._stub = fledger_pb2_grpc.AdminStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except grpc.RpcError as exc:
            raise as_net_error(exc, self.address) from exc

    def status(self, timeout: float | None = None) -> NodeStatus:
        return serde.status_from_msg(self._call(lambda: self._stub.Status(
            EmptyMsg(), timeout=timeout or self.deadlines.query)))

    def train(self, rounds: int) -> Generator[RoundLine, None, None]:
        """Start (or follow) training; yields a line per finished round or note, until the job ends. Closing the
        iterator early cancels the call (training goes on at the node)."""
        stream = self._call(lambda: self._stub.Train(TrainRequestMsg(rounds=rounds), timeout=self.deadlines.train))
        try:
            while True:
                msg = self._call(lambda: next(stream, None))
                if msg is None:
                    return
                yield RoundLine.from_msg(msg)
        finally:
            stream.cancel()

    def pause(self) -> None:
        self._call(lambda: self._stub.Pause(EmptyMsg(), timeout=self.deadlines.query))

    def save(self, path: str) -> tuple[str, str]:
        reply = self._call(lambda: self._stub.Save(SaveRequestMsg(path=path), timeout=self.deadlines.query))
        return reply.path, reply.model_hash

    def evaluate(self) -> EvalReport:
        return serde.eval_report_from_msg(self._call(lambda: self._stub.Eval(EmptyMsg(),
                                                                             timeout=self.deadlines.train)))

    def nodes(self) -> list[MemberView]:
        listed = self._call(lambda: self._stub.ListNodes(EmptyMsg(), timeout=self.deadlines.query))
        return [serde.view_from_msg(m) for m in listed.members]

    def block(self, height: int) -> BlockView:
        """The block at ``height`` with its records, signatures checked (BadRequestError when they do not)."""
        reply = self._call(lambda: self._stub.GetBlock(HeightMsg(height=height), timeout=self.deadlines.query))
        block = serde.block_from_msg(reply.block)
        if reply.hash and reply.hash != block.hash:
            raise BadRequestError(f"{self.address} sent block {height} under another hash")
        return BlockView(block, [serde.record_from_msg(r) for r in reply.records])

    def tokens(self) -> dict[str, str]:
        """The entry's current join tokens by role ("supernode", "edge")."""
        reply = self._call(lambda: self._stub.Tokens(EmptyMsg(), timeout=self.deadlines.query))
        return {"supernode": reply.supernode, "edge": reply.edge}

    def rotate_token(self, role: str) -> dict[str, str]:
        """Revoke ``role``'s join token and issue a new one; the current tokens by role."""
        reply = self._call(lambda: self._stub.RotateToken(RotateRequestMsg(role=role), timeout=self.deadlines.query))
        return {"supernode": reply.supernode, "edge": reply.edge}

    def verify(self) -> tuple[bool, int, str]:
        """(the chain verifies, blocks, message) as the node reports them."""
        reply = self._call(lambda: self._stub.Verify(EmptyMsg(), timeout=self.deadlines.train))
        return reply.ok, reply.blocks, reply.message

    def remove_supernode(self, node_id: str) -> MembershipResult:
        """Remove validator ``node_id`` by a membership block (the entry waits for a running round to end first);
        the block's height and hash and the validators after it."""
        reply = self._call(lambda: self._stub.RemoveSuperNode(RemoveRequestMsg(node_id=node_id),
                                                              timeout=self.deadlines.round))
        return MembershipResult(reply.height, reply.hash, tuple(reply.validators))

    def model(self, height: int) -> tuple[dict[str, np.ndarray], str]:
        """The model at ``height`` from the SuperNode service, decoded and checked against its announced hash."""
        stub = fledger_pb2_grpc.SuperNodeStub(self._channel)
        return self._call(lambda: transport.receive_weights(
            stub.GetModel(HeightMsg(height=height), timeout=self.deadlines.sync)))


class RoundLine:
    """One Train progress message as the console and the cluster command print it."""

    def __init__(self, round: int, height: int, block_hash: str, participants: int, failures: int,
                 metrics: dict[str, float], timings: dict[str, float], message: str, error: bool = False,
                 excluded: Sequence[tuple[str, str]] = (), dropped: Sequence[tuple[str, str]] = ()):
        self.round, self.height, self.block_hash = round, height, block_hash
        self.error = error   # a note saying training stopped on an error
        self.participants, self.failures = participants, failures
        self.metrics, self.timings, self.message = metrics, timings, message
        self.excluded = list(excluded)   # (edge id, why): updates refused or left out by the aggregation rule
        self.dropped = list(dropped)     # (edge id, why): selected under a scenario but not trained

    @classmethod
    def from_msg(cls, msg: TrainProgressMsg) -> RoundLine:
        return cls(msg.round, msg.height, msg.block_hash, msg.participants, msg.failures, dict(msg.metrics),
                   dict(msg.timings), msg.message, msg.error, serde.excluded_from_msg(msg), serde.dropped_from_msg(msg))

    @classmethod
    def of(cls, progress: Progress) -> RoundLine:
        return cls.from_msg(serde.progress_to_msg(progress))

    @property
    def finished(self) -> bool:
        """A finished round (it has a block), not a note."""
        return bool(self.block_hash)

    def text(self) -> str:
        if not self.finished:
            return self.message
        acc = f"accuracy {self.metrics['accuracy']:.2%}  " if "accuracy" in self.metrics else ""
        return (f"round {self.round}  {acc}{self.participants} edge nodes  {self.failures} failed  "
                f"block {self.height} {self.block_hash[:12]}" +
                (f"  {self.timings['round_s']:.2f} s" if "round_s" in self.timings else "") +
                (f"  sim {self.timings['sim_round_s']:.1f} s (clock {self.timings['sim_time_s']:.1f} s)"
                 if "sim_round_s" in self.timings and "sim_time_s" in self.timings else "") +
                (f"  {len(self.dropped)} dropped" if self.dropped else "") +
                (f"  ({self.message})" if self.message else "") +
                (f"  {self.excluded_text()}" if self.excluded else ""))

    def excluded_text(self, shown: int = 3) -> str:
        """"excluded: 3fa2c81b09de, 77e0a1c2f5b4 and 2 more": the first ``shown`` excluded edges (their reasons are
        among the failures the message lists)."""
        more = len(self.excluded) - shown
        return ("excluded: " + ", ".join(edge[:12] for edge, _ in self.excluded[:shown]) +
                (f" and {more} more" if more > 0 else ""))


def probe_health(address: str, timeout: float = 3.0, security: TlsCredentials | None = None) -> bool:
    """The standard gRPC health service of a node says SERVING."""
    return transport.probe_health(address, timeout, security)


def speaks_tls(address: str, timeout: float = 3.0) -> bool:
    """The node at ``address`` runs in secure mode (answers TLS, not plaintext)."""
    return transport.speaks_tls(address, timeout)
