"""The super node's peer-facing gRPC services: Registry (entry only) and SuperNode (every SN). Thin servicers."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection

from chain.block import Cosignature
from chain.keys import NodeKey
from node import serde, sync, transport
from node.coordinator import EdgeRef, Partial, partial_parts
from node.errors import BadRequestError, DeadNodeError, StaleRoundError, UnknownNodeError
from node.ledger import Ledger
from node.registry import Member, Membership, SuperNodeRegistry
from storage.store import StoreError
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import CommitReply as CommitReplyMsg
from proto.fledger_pb2 import Head as HeadMsg
from proto.fledger_pb2 import HeartbeatReply as HeartbeatReplyMsg
from proto.fledger_pb2 import MemberEntry as MemberEntryMsg
from proto.fledger_pb2 import MemberList as MemberListMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg
from proto.fledger_pb2 import RegisterReply as RegisterReplyMsg

log = logging.getLogger(__name__)


def member_to_msg(member: Member, alive: bool = True, silent_s: float = 0.0, role: str = "", parent_id: str = "",
                  partition_index: int | None = None) -> MemberEntryMsg:
    info = NodeInfoMsg(node_id=member.node_id, public_key=member.public_key, address=member.address,
                       capacity=member.capacity, samples=member.samples, partition_index=partition_index)
    return MemberEntryMsg(info=info, load=member.load, alive=alive, role=role, parent_id=parent_id,
                          silent_s=max(0.0, silent_s))


def _register_reply(table: Membership) -> RegisterReplyMsg:
    return RegisterReplyMsg(heartbeat_interval_s=table.heartbeat_interval, missed_beats=table.missed_beats)


def head_msg(ledger: Ledger) -> HeadMsg:
    tip = ledger.tip
    if tip is None:
        return HeadMsg(empty=True)
    return HeadMsg(height=tip.header.height, hash=tip.hash, model_hash=tip.header.model_hash)


class RegistryServicer(fledger_pb2_grpc.RegistryServicer):
    """Thin: the entry's SuperNodeRegistry behind gRPC."""

    def __init__(self, registry: SuperNodeRegistry, entry_id: str):
        self.registry = registry
        self.entry_id = entry_id

    @transport.guarded
    def RegisterSuperNode(self, request, context):
        self.registry.register(request.node_id, request.public_key, request.address, capacity=request.capacity)
        return _register_reply(self.registry)

    def ListSuperNodes(self, request, context):
        return MemberListMsg(members=self.supernode_entries(request.include_dead))

    def supernode_entries(self, include_dead: bool) -> list[MemberEntryMsg]:
        return [member_to_msg(m, alive, silent, "entry" if m.node_id == self.entry_id else "supernode")
                for m, alive, silent in self.registry.listing(include_dead)]

    @transport.guarded
    def AssignSuperNode(self, request, context):
        return member_to_msg(self.registry.assign(request.node_id, request.public_key), role="supernode")

    @transport.guarded
    def Heartbeat(self, request, context):
        self.registry.heartbeat(request.node_id, load=request.load)
        return HeartbeatReplyMsg()


class SuperNodeServicer(fledger_pb2_grpc.SuperNodeServicer):
    """Thin: edge membership, round training, block co-signing/commit and chain serving over this SN's ledger."""

    def __init__(self, ledger: Ledger, key: NodeKey, edges: Membership,
                 on_announce: Callable[[int, int, str, Collection[str] | None], Partial] | None = None):
        self.ledger = ledger
        self.key = key
        self.edges = edges
        self.on_announce = on_announce      # (round, base_height, base_hash, selected ids) -> this SN's partial
        self._lock = threading.Lock()
        self._pending: dict[str, sync.IncomingBlock] = {}   # block hash -> co-signed, not yet committed
        self.partition_index: dict[str, int] = {}            # edge id -> its data share, when it told us

    @transport.guarded
    def RegisterEdge(self, request, context):
        self.edges.register(request.node_id, request.public_key, request.address, samples=request.samples)
        if request.HasField("partition_index"):
            with self._lock:
                self.partition_index[request.node_id] = request.partition_index
        return _register_reply(self.edges)

    def edge_refs(self) -> list[EdgeRef]:
        """This SN's live edge nodes."""
        return [EdgeRef.from_entry(m) for m in self.edge_entries(include_dead=False)]

    def edge_entries(self, include_dead: bool) -> list[MemberEntryMsg]:
        with self._lock:
            index = dict(self.partition_index)
        return [member_to_msg(m, alive, silent, "edge", self.key.node_id, index.get(m.node_id))
                for m, alive, silent in self.edges.listing(include_dead)]

    def ListEdges(self, request, context):
        return MemberListMsg(members=self.edge_entries(request.include_dead))

    @transport.guarded_stream
    def AnnounceRound(self, request, context):
        if self.on_announce is None:
            raise StaleRoundError("this super node takes no part in rounds")
        selected = list(request.participants) or None
        yield from partial_parts(self.on_announce(request.round, request.base_height, request.base_model_hash,
                                                  selected))

    @transport.guarded
    def EdgeHeartbeat(self, request, context):
        self.edges.heartbeat(request.node_id)
        return HeartbeatReplyMsg()

    @transport.guarded
    def ProposeBlock(self, request_iterator, context):
        blocks = list(sync.read_blocks(request_iterator))
        if len(blocks) != 1:
            raise BadRequestError(f"ProposeBlock carries exactly one block, got {len(blocks)}")
        incoming = blocks[0]
        header = sync.verify_incoming(self.ledger.tip, incoming, self.ledger.authority)
        with self._lock:
            self._pending = {h: b for h, b in self._pending.items() if b.block.header.height >= header.height}
            self._pending[incoming.block.hash] = incoming
        log.info("co-signing block %d (%s...) by %s", header.height, incoming.block.hash[:16], header.proposer_id)
        return serde.cosig_to_msg(Cosignature.create(header.height, incoming.block.hash, self.key))

    @transport.guarded
    def CommitBlock(self, request, context):
        with self._lock:
            incoming = self._pending.get(request.hash)
        if incoming is None:
            raise UnknownNodeError(f"no proposed block {request.hash} is pending here; propose it first")
        cosigs = [serde.cosig_from_msg(c) for c in request.cosignatures]
        bad = [c.signer_key[:16] for c in cosigs if not c.valid_for(request.height, request.hash)]
        if bad or not cosigs:
            raise BadRequestError(f"commit needs valid co-signatures; bad or missing: {bad or 'none given'}")
        if len({c.signer_key for c in cosigs}) != len(cosigs):
            raise BadRequestError("commit lists a co-signer twice")
        # Only the proposer declares a block final: its own co-signature must be among them.
        if incoming.block.header.proposer_key not in {c.signer_key for c in cosigs}:
            raise BadRequestError("commit lacks the proposer's co-signature; only the proposer finalises a block")
        incoming.cosignatures = cosigs
        # The tip may have moved since it was co-signed.
        sync.verify_incoming(self.ledger.tip, incoming, self.ledger.authority)
        durable = self.ledger.accept(incoming.block, incoming.records, incoming.weights_blob, cosigs)
        try:
            durable.result()   # answer only once the block is stored: the proposer counts on it being final here
        except StoreError as exc:
            raise DeadNodeError(f"block {request.height} could not be stored here: {exc}") from exc
        with self._lock:
            # Drop this block and any other proposal for the same height: only one can ever extend the chain.
            self._pending = {h: b for h, b in self._pending.items()
                             if h != request.hash and b.block.header.height > request.height}
        return CommitReplyMsg()

    def GetHead(self, request, context):
        return head_msg(self.ledger)

    @transport.guarded_stream
    def GetBlocks(self, request, context):
        tip = self.ledger.tip
        if tip is None:
            return
        end = tip.header.height if request.to_height == 0 else min(request.to_height, tip.header.height)
        if request.from_height > end:
            raise StaleRoundError(f"no blocks from height {request.from_height}; head is {tip.header.height}")
        yield from sync.ledger_parts(self.ledger, request.from_height, end)

    @transport.guarded_stream
    def GetModel(self, request, context):
        tip = self.ledger.tip
        if tip is None or request.height > tip.header.height:
            raise UnknownNodeError(f"no block at height {request.height}")
        block, _ = self.ledger.get_block(request.height)
        yield from transport.blob_chunks(self.ledger.load_weights_blob(request.height), block.header.model_hash)
