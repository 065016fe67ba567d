"""The gRPC servicers, all thin: unpack the request with serde, call the domain object, pack the answer; domain
errors become status codes through ``transport.guarded``. No servicer holds state of its own."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from chain.tensors import encode_weights, encoded_size
from node.engine.edge import EdgeCore
from node.engine.errors import BadRequestError, NoCapacityError, UnauthenticatedError, UnavailableError
from node.engine.membership import Membership, SuperNodeRegistry
from node.engine.pacing import Pacer
from node.engine.supernode import SuperNodeCore
from node.engine.views import AdminBackend, MemberView
from node.rpc import serde, transport
from node.rpc.options import MAX_MODEL_BYTES, TRANSFER_SLACK_BYTES
from node.rpc.security import claim
from node.security.tokens import Enroller, JoinRefused
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import BlockView as BlockViewMsg
from proto.fledger_pb2 import CommitReply as CommitReplyMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import FitReply as FitReplyMsg
from proto.fledger_pb2 import FitSummary as FitSummaryMsg
from proto.fledger_pb2 import HeartbeatReply as HeartbeatReplyMsg
from proto.fledger_pb2 import JoinReply as JoinReplyMsg
from proto.fledger_pb2 import MemberList as MemberListMsg
from proto.fledger_pb2 import MembershipReply as MembershipReplyMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg
from proto.fledger_pb2 import RegisterReply as RegisterReplyMsg
from proto.fledger_pb2 import SaveReply as SaveReplyMsg
from proto.fledger_pb2 import TokensReply as TokensReplyMsg
from proto.fledger_pb2 import TrainProgress as TrainProgressMsg
from proto.fledger_pb2 import VerifyReply as VerifyReplyMsg
from proto.fledger_pb2 import WeightsChunk as WeightsChunkMsg

Context = Any   # grpc.ServicerContext


def _register_reply(table: Membership) -> RegisterReplyMsg:
    return RegisterReplyMsg(heartbeat_interval_s=table.heartbeat_interval, missed_beats=table.missed_beats)


def _share(info: NodeInfoMsg) -> int | None:
    return info.partition_index if info.HasField("partition_index") else None


class RegistryServicer(fledger_pb2_grpc.RegistryServicer):
    """The entry's super-node registry."""

    def __init__(self, registry: SuperNodeRegistry, entry_id: str):
        self.registry = registry
        self.entry_id = entry_id

    @transport.guarded
    def RegisterSuperNode(self, request: NodeInfoMsg, context: Context) -> RegisterReplyMsg:
        claim(context, request.node_id, request.public_key)
        self.registry.register(request.node_id, request.public_key, request.address, capacity=request.capacity)
        return _register_reply(self.registry)

    def ListSuperNodes(self, request: Any, context: Context) -> MemberListMsg:
        return MemberListMsg(members=[
            serde.member_to_msg(m, alive, silent, "entry" if m.node_id == self.entry_id else "supernode")
            for m, alive, silent in self.registry.listing(request.include_dead)])

    @transport.guarded
    def AssignSuperNode(self, request: NodeInfoMsg, context: Context) -> Any:
        claim(context, request.node_id, request.public_key)
        return serde.member_to_msg(self.registry.assign(request.node_id, request.public_key, _share(request)),
                                   role="supernode")

    @transport.guarded
    def Heartbeat(self, request: Any, context: Context) -> HeartbeatReplyMsg:
        claim(context, request.node_id)
        self.registry.heartbeat(request.node_id, load=request.load)
        return HeartbeatReplyMsg()


class LocalRegistryServicer(fledger_pb2_grpc.RegistryServicer):
    """The Registry of a super node that is not the entry: while the entry is unreachable, an edge node can register
    through any validator. It assigns edge nodes to itself (room permitting) and lists the super nodes it knows;
    super nodes register and heartbeat at the entry only."""

    def __init__(self, core: SuperNodeCore, edges: Membership, me: Callable[[], MemberView],
                 known: Callable[[], list[MemberView]], entry: str):
        self.core = core
        self.edges = edges
        self.me = me          # this super node as getSN() lists it
        self.known = known    # the other super nodes it knows
        self.entry = entry

    def _not_here(self) -> NoReturn:
        raise UnavailableError(f"super nodes register at the entry ({self.entry}), not here")

    @transport.guarded
    def RegisterSuperNode(self, request: NodeInfoMsg, context: Context) -> RegisterReplyMsg:
        self._not_here()

    @transport.guarded
    def Heartbeat(self, request: Any, context: Context) -> HeartbeatReplyMsg:
        self._not_here()

    def ListSuperNodes(self, request: Any, context: Context) -> MemberListMsg:
        return MemberListMsg(members=[serde.view_to_msg(v) for v in [self.me(), *self.known()]
                                      if v.alive or request.include_dead])

    @transport.guarded
    def AssignSuperNode(self, request: NodeInfoMsg, context: Context) -> Any:
        claim(context, request.node_id, request.public_key)
        if self.edges.capacity and len(self.edges) >= self.edges.capacity:
            raise NoCapacityError(f"super node {self.core.node_id} is full ({self.edges.capacity} edge nodes)")
        return serde.view_to_msg(self.me())


class SuperNodeServicer(fledger_pb2_grpc.SuperNodeServicer):
    """A super node's edge membership, rounds, co-signing, commits and chain, over its SuperNodeCore."""

    def __init__(self, core: SuperNodeCore, edges: Membership, pacer: Pacer | None = None):
        self.core = core
        self.edges = edges
        self.pacer = pacer   # a scenario's backbone time, spent for real (node.engine.pacing)

    @transport.guarded
    def RegisterEdge(self, request: NodeInfoMsg, context: Context) -> RegisterReplyMsg:
        claim(context, request.node_id, request.public_key)
        self.edges.register(request.node_id, request.public_key, request.address, samples=request.samples,
                            share=_share(request))
        return _register_reply(self.edges)

    @transport.guarded
    def EdgeHeartbeat(self, request: Any, context: Context) -> HeartbeatReplyMsg:
        claim(context, request.node_id)
        self.edges.heartbeat(request.node_id)
        return HeartbeatReplyMsg()

    def ListEdges(self, request: Any, context: Context) -> MemberListMsg:
        return MemberListMsg(members=[serde.member_to_msg(m, alive, silent, "edge", self.core.node_id)
                                      for m, alive, silent in self.edges.listing(request.include_dead)])

    @transport.guarded_stream
    def AnnounceRound(self, request: Any, context: Context) -> Iterator[Any]:
        since = time.monotonic()
        claim(context, request.proposer_id)
        announcement = serde.announcement_from_msg(request)
        pacer = self.pacer
        if pacer is not None:
            pacer.announcement(since)
        partial = self.core.train(announcement)
        if pacer is not None and partial.samples > 0:
            nbytes = sum(encoded_size(u.weights) for u in partial.updates) if partial.updates \
                else encoded_size(partial.weights or {})
            pacer.partial(nbytes)
        yield from serde.partial_parts(partial)

    @transport.guarded
    def ProposeBlock(self, request_iterator: Iterator[Any], context: Context) -> Any:
        head = self.core.head()   # a proposed block's model is the size of the head's, give or take its header
        limit = len(self.core.base().blob) + TRANSFER_SLACK_BYTES if head is not None else MAX_MODEL_BYTES
        since = time.monotonic()
        data, view, sender = serde.read_proposal(iter(request_iterator), limit)
        claim(context, sender)
        cosignature = self.core.cosign(data, view, sender)
        if self.pacer is not None:
            self.pacer.proposal(len(data.weights_blob), since)
        return serde.cosig_to_msg(cosignature)

    @transport.guarded
    def CommitBlock(self, request: Any, context: Context) -> CommitReplyMsg:
        since = time.monotonic()
        self.core.commit(request.height, request.hash, [serde.cosig_from_msg(c) for c in request.cosignatures])
        if self.pacer is not None:
            self.pacer.commit(since)
        return CommitReplyMsg()

    @transport.guarded
    def Promise(self, request: Any, context: Context) -> Any:
        claim(context, request.candidate_id)
        return serde.promise_to_msg(self.core.promise(request.view, request.candidate_id))

    @transport.guarded_stream
    def GetPrepared(self, request: Any, context: Context) -> Iterator[Any]:
        data = self.core.prepared_block()
        if data is not None:
            yield from serde.block_parts(data)

    def GetHead(self, request: Any, context: Context) -> Any:
        return serde.head_to_msg(self.core.head())

    @transport.guarded_stream
    def GetBlocks(self, request: Any, context: Context) -> Iterator[Any]:
        head = self.core.head()
        if head is None:
            return
        end = head.height if request.to_height == 0 else request.to_height
        for data in self.core.blocks(request.from_height, end):
            yield from serde.block_parts(data)

    @transport.guarded_stream
    def GetModel(self, request: Any, context: Context) -> Iterator[WeightsChunkMsg]:
        model_hash, blob = self.core.model_blob(request.height)
        yield from transport.blob_chunks(blob, model_hash)


class AdminServicer(fledger_pb2_grpc.AdminServicer):
    """Console queries and commands over any AdminBackend (a super node)."""

    def __init__(self, backend: AdminBackend):
        self.backend = backend

    def Status(self, request: Any, context: Context) -> Any:
        return serde.status_to_msg(self.backend.status())

    @transport.guarded_stream
    def Train(self, request: Any, context: Context) -> Iterator[TrainProgressMsg]:
        job, started = self.backend.start_training(request.rounds)
        if not started:
            yield TrainProgressMsg(round=self.backend.status().round,
                                   message=f"already training rounds {job.first_round}-{job.last_round}; "
                                           "following that run")
        for progress in self.backend.follow(job, context.is_active):
            yield serde.progress_to_msg(progress)

    @transport.guarded
    def Pause(self, request: Any, context: Context) -> EmptyMsg:
        self.backend.pause()
        return EmptyMsg()

    @transport.guarded
    def Save(self, request: Any, context: Context) -> SaveReplyMsg:
        path, digest = self.backend.save_model(request.path or None)
        return SaveReplyMsg(path=str(path), model_hash=digest)

    @transport.guarded
    def Eval(self, request: Any, context: Context) -> Any:
        return serde.eval_report_to_msg(self.backend.evaluate())

    def ListNodes(self, request: Any, context: Context) -> MemberListMsg:
        return MemberListMsg(members=[serde.view_to_msg(v) for v in self.backend.network_view()])

    @transport.guarded
    def GetBlock(self, request: Any, context: Context) -> BlockViewMsg:
        view = self.backend.block(request.height)
        return BlockViewMsg(block=serde.block_to_msg(view.block),
                            records=[serde.record_to_msg(r) for r in view.records],
                            hash=view.block.hash)

    def Verify(self, request: Any, context: Context) -> VerifyReplyMsg:
        try:
            report = self.backend.verify_chain()
        except Exception as exc:  # VerificationError names height and check; the console shows it
            return VerifyReplyMsg(ok=False, message=str(exc))
        return VerifyReplyMsg(ok=True, blocks=report.blocks, message=f"head {report.head_height} {report.head_hash}")

    @transport.guarded
    def RemoveSuperNode(self, request: Any, context: Context) -> MembershipReplyMsg:
        result = self.backend.remove_supernode(request.node_id)
        return MembershipReplyMsg(height=result.height, hash=result.hash, validators=list(result.validators))

    @transport.guarded
    def Tokens(self, request: Any, context: Context) -> TokensReplyMsg:
        return TokensReplyMsg(**self.backend.tokens())

    @transport.guarded
    def RotateToken(self, request: Any, context: Context) -> TokensReplyMsg:
        return TokensReplyMsg(**self.backend.rotate_token(request.role))


class EnrollmentServicer(fledger_pb2_grpc.EnrollmentServicer):
    """The entry's join port: a node with a join token gets a certificate for its own key."""

    def __init__(self, enroller: Enroller):
        self.enroller = enroller

    @transport.guarded
    def Join(self, request: Any, context: Context) -> JoinReplyMsg:
        try:
            ca, cert, mac = self.enroller.join(serde.join_request_from_msg(request))
        except JoinRefused as exc:
            raise UnauthenticatedError(f"join refused: {exc}") from exc
        return JoinReplyMsg(ca_certificate=ca, certificate=cert, mac=mac)


class EdgeServicer(fledger_pb2_grpc.EdgeNodeServicer):
    """An edge node's training and evaluation over its EdgeCore."""

    def __init__(self, core: EdgeCore, info: MemberView, pacer: Pacer | None = None):
        self.core = core
        self.info = info
        self.pacer = pacer   # a scenario's link and device time, spent for real (node.engine.pacing)

    @property
    def max_bytes(self) -> int:
        """No model sent here is bigger than this edge node's own (plus room for the blob's header)."""
        return self.core.model_bytes + TRANSFER_SLACK_BYTES

    @transport.guarded_stream
    def Fit(self, request_iterator: Iterator[Any], context: Context) -> Iterator[FitReplyMsg]:
        first = next(request_iterator, None)
        since = time.monotonic()
        if first is None or first.WhichOneof("part") != "ins":
            raise BadRequestError("a Fit stream must start with the FitIns message")
        ins = serde.fit_ins_from_msg(first.ins)
        weights, base_hash = transport.receive_weights(_weights_only(request_iterator), self.max_bytes)
        # Training stops (between two batches) once the call ends: the caller cancelled or its deadline passed.
        cancel = threading.Event()
        if not context.add_callback(cancel.set):   # the call has already ended
            cancel.set()
        pacer, share = self.pacer, self.core.share
        if pacer is not None and share is not None:
            pacer.edge_download(share, ins.round, encoded_size(weights), since, cancel)
            since = time.monotonic()
        res, record, update_hash, train_s = self.core.fit(weights, ins, base_hash, cancel)
        if pacer is not None and share is not None:
            pacer.edge_compute(share, self.core.samples, ins.epochs, since, cancel)
            pacer.edge_upload(share, ins.round, encoded_size(res.weights), cancel)
        yield FitReplyMsg(summary=FitSummaryMsg(samples=res.samples, metrics=serde.metrics_to_msg(res.metrics),
                                                record=serde.record_to_msg(record), train_s=train_s))
        for chunk in transport.blob_chunks(encode_weights(res.weights), update_hash):
            yield FitReplyMsg(weights=chunk)

    @transport.guarded
    def Evaluate(self, request_iterator: Iterator[WeightsChunkMsg], context: Context) -> Any:
        weights, _ = transport.receive_weights(request_iterator, self.max_bytes)
        return serde.eval_to_msg(self.core.evaluate(weights))

    def Info(self, request: Any, context: Context) -> NodeInfoMsg:
        return serde.view_to_msg(self.info).info


def _weights_only(requests: Iterator[Any]) -> Iterator[WeightsChunkMsg]:
    for request in requests:
        if request.WhichOneof("part") != "weights":
            raise BadRequestError("after FitIns a Fit stream may only carry weights chunks")
        yield request.weights


def add_supernode_services(server: Any, core: SuperNodeCore, edges: Membership, admin: AdminBackend,
                           registry: SuperNodeRegistry | LocalRegistryServicer | None = None,
                           authorize: transport.Authorize | None = None, pacer: Pacer | None = None) -> None:
    """Serve a super node: SuperNode and Admin, and Registry: the entry's registry, or a non-entry super node's
    ``LocalRegistryServicer`` (requests parsed, peers limited and ``authorize`` called per call by
    ``transport.add_service``)."""
    transport.add_service(server, "fledger.v1.SuperNode", SuperNodeServicer(core, edges, pacer), authorize=authorize)
    transport.add_service(server, "fledger.v1.Admin", AdminServicer(admin), authorize=authorize)
    if registry is not None:
        servicer = registry if isinstance(registry, LocalRegistryServicer) else RegistryServicer(registry,
                                                                                                   core.node_id)
        transport.add_service(server, "fledger.v1.Registry", servicer, authorize=authorize)


def add_edge_service(server: Any, core: EdgeCore, info: MemberView,
                     authorize: transport.Authorize | None = None, pacer: Pacer | None = None) -> None:
    """Serve an edge node's EdgeNode service (see ``add_supernode_services``)."""
    transport.add_service(server, "fledger.v1.EdgeNode", EdgeServicer(core, info, pacer), authorize=authorize)


def add_enrollment_service(server: Any, enroller: Enroller, authorize: Any = None) -> None:
    """Serve the entry's Enrollment service (on its join port: the authorizer lets only Join through there)."""
    transport.add_service(server, "fledger.v1.Enrollment", EnrollmentServicer(enroller), authorize=authorize)
