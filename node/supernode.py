"""The super node (SN): entry registry, edge membership, block co-signing and commit, chain serving, admin status."""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from chain.block import Cosignature, SignedBlock, SignedRecord
from chain.keys import NodeKey
from chain.tensors import model_hash
from config import Config
from node import serde, sync, transport
from node.coordinator import (Coordinator, EdgeRef, Partial, RoundReport, RunContext, Trainer, partial_parts,
                              train_partial)
from node.errors import BadRequestError, StaleRoundError, UnknownNodeError
from node.ledger import Ledger
from node.options import DEADLINES
from node.proxy import GrpcParticipant, RemoteError
from node.registry import Member, Membership, SuperNodeRegistry
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import EdgeEval as EdgeEvalMsg
from proto.fledger_pb2 import EvalReply as EvalReplyMsg
from proto.fledger_pb2 import SaveReply as SaveReplyMsg
from proto.fledger_pb2 import TrainProgress as TrainProgressMsg
from proto.fledger_pb2 import BlockView as BlockViewMsg
from proto.fledger_pb2 import CommitReply as CommitReplyMsg
from proto.fledger_pb2 import CommitRequest as CommitRequestMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import Head as HeadMsg
from proto.fledger_pb2 import HeartbeatReply as HeartbeatReplyMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import MemberEntry as MemberEntryMsg
from proto.fledger_pb2 import MemberList as MemberListMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg
from proto.fledger_pb2 import RegisterReply as RegisterReplyMsg
from proto.fledger_pb2 import StatusReply as StatusReplyMsg
from proto.fledger_pb2 import VerifyReply as VerifyReplyMsg

log = logging.getLogger(__name__)

SERVICES = ("fledger.v1.Registry", "fledger.v1.SuperNode", "fledger.v1.Admin")


def member_to_msg(member: Member) -> MemberEntryMsg:
    info = NodeInfoMsg(node_id=member.node_id, public_key=member.public_key, address=member.address,
                       capacity=member.capacity, samples=member.samples)
    return MemberEntryMsg(info=info, load=member.load, alive=True)


def _register_reply(table: Membership) -> RegisterReplyMsg:
    return RegisterReplyMsg(heartbeat_interval_s=table.heartbeat_interval, missed_beats=table.missed_beats)


class RegistryServicer(fledger_pb2_grpc.RegistryServicer):
    """Thin: the entry's SuperNodeRegistry behind gRPC."""

    def __init__(self, registry: SuperNodeRegistry):
        self.registry = registry

    @transport.guarded
    def RegisterSuperNode(self, request, context):
        self.registry.register(request.node_id, request.public_key, request.address, capacity=request.capacity)
        return _register_reply(self.registry)

    def ListSuperNodes(self, request, context):
        return MemberListMsg(members=[member_to_msg(m) for m in self.registry.members()])

    @transport.guarded
    def AssignSuperNode(self, request, context):
        return member_to_msg(self.registry.assign(request.node_id, request.public_key))

    @transport.guarded
    def Heartbeat(self, request, context):
        self.registry.heartbeat(request.node_id, load=request.load)
        return HeartbeatReplyMsg()


def head_msg(ledger: Ledger) -> HeadMsg:
    tip = ledger.tip
    if tip is None:
        return HeadMsg(empty=True)
    return HeadMsg(height=tip.header.height, hash=tip.hash, model_hash=tip.header.model_hash)


class SuperNodeServicer(fledger_pb2_grpc.SuperNodeServicer):
    """Thin: edge membership, round training, block co-signing/commit and chain serving over this SN's ledger."""

    def __init__(self, ledger: Ledger, key: NodeKey, edges: Membership,
                 on_announce: Callable[[int, int, str], Partial] | None = None):
        self.ledger = ledger
        self.key = key
        self.edges = edges
        self.on_announce = on_announce      # (round, base_height, base_hash) -> this SN's partial
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
        with self._lock:
            index = dict(self.partition_index)
        return [EdgeRef(m.node_id, m.address, index.get(m.node_id)) for m in self.edges.members()]

    @transport.guarded_stream
    def AnnounceRound(self, request, context):
        if self.on_announce is None:
            raise StaleRoundError("this super node takes no part in rounds")
        yield from partial_parts(self.on_announce(request.round, request.base_height, request.base_model_hash))

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
        header = sync.verify_incoming(self.ledger.tip, incoming)
        with self._lock:
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
        incoming.cosignatures = cosigs
        sync.verify_incoming(self.ledger.tip, incoming)   # the tip may have moved since it was co-signed
        self.ledger.accept(incoming.block, incoming.records, incoming.weights_blob, cosigs)
        with self._lock:
            self._pending.pop(request.hash, None)
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


class AdminServicer(fledger_pb2_grpc.AdminServicer):
    """Thin: console queries and commands over one SuperNode (training runs on the entry only)."""

    def __init__(self, node: "SuperNode"):
        self.node = node
        self.ledger, self.key, self.edges, self.registry = node.ledger, node.key, node.edges, node.registry

    def Status(self, request, context):
        trainer = self.node.trainer
        tip = self.ledger.tip
        return StatusReplyMsg(node_id=self.key.node_id, role="entry" if self.registry else "supernode",
                              head=head_msg(self.ledger), edges=len(self.edges),
                              supernodes=len(self.registry) if self.registry else 0,
                              training=bool(trainer and trainer.training),
                              paused=bool(trainer and trainer.pause_requested),
                              round=trainer.current_round if trainer else (tip.header.round if tip else 0))

    def Train(self, request, context):
        trainer = self.node.trainer
        if trainer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"training runs on the entry super node ({self.node.entry}); connect the console there")
        if self.ledger.tip is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the chain has no genesis block yet")
        job, started = trainer.start(request.rounds)
        if not started:
            yield TrainProgressMsg(round=trainer.current_round,
                                   message=f"already training rounds {job.first_round}-{job.last_round}; "
                                           "following that run")
        yield from trainer.follow(job, alive=context.is_active)

    def Pause(self, request, context):
        if self.node.trainer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"training runs on the entry super node ({self.node.entry}); pause it there")
        self.node.trainer.pause()
        return EmptyMsg()

    @transport.guarded
    def Save(self, request, context):
        path, digest = self.node.save_model(request.path or None)
        return SaveReplyMsg(path=str(path), model_hash=digest)

    @transport.guarded
    def Eval(self, request, context):
        return self.node.evaluate()

    def ListNodes(self, request, context):
        members = (self.registry.members() if self.registry else []) + self.edges.members()
        return MemberListMsg(members=[member_to_msg(m) for m in members])

    @transport.guarded
    def GetBlock(self, request, context):
        tip = self.ledger.tip
        if tip is None or request.height > tip.header.height:
            raise UnknownNodeError(f"no block at height {request.height}")
        self.ledger.flush()
        block, records = self.ledger.get_block(request.height)
        return BlockViewMsg(block=serde.block_to_msg(block), records=[serde.record_to_msg(r) for r in records],
                            hash=block.hash)

    def Verify(self, request, context):
        try:
            report = self.ledger.verify()
        except Exception as exc:  # VerificationError names height and check; the console shows it
            return VerifyReplyMsg(ok=False, message=str(exc))
        return VerifyReplyMsg(ok=True, blocks=report.blocks, message=f"head {report.head_height} {report.head_hash}")


def propose_and_commit(ledger: Ledger, peers: list[str], block: SignedBlock, records: list[SignedRecord],
                       blob: bytes) -> list[Cosignature]:
    """Send a block this node proposed (already in ``ledger``) to every peer SN and commit it on a majority.

    The proposer's own co-signature counts towards a strict majority of ``len(peers) + 1`` SNs; on success the
    co-signatures are stored with the block here and sent to every peer in CommitBlock. Raises StaleRoundError
    when no majority co-signed (peers that refused are logged).
    """
    header = block.header
    cosigs = [Cosignature.create(header.height, block.hash, ledger.key)]
    for peer in peers:
        try:
            with transport.open_channel(peer) as channel:
                reply = fledger_pb2_grpc.SuperNodeStub(channel).ProposeBlock(
                    sync.block_parts(block, records, blob, header.model_hash), timeout=DEADLINES.block)
            cosig = serde.cosig_from_msg(reply)
            if cosig.valid_for(header.height, block.hash):
                cosigs.append(cosig)
            else:
                log.warning("peer %s returned an invalid co-signature for block %d", peer, header.height)
        except grpc.RpcError as exc:
            log.warning("peer %s refused block %d: %s", peer, header.height, transport.rpc_error_text(exc))
    total = len(peers) + 1
    if len(cosigs) * 2 <= total:
        raise StaleRoundError(f"block {header.height} got {len(cosigs)} of {total} co-signatures; no majority")
    request = CommitRequestMsg(height=header.height, hash=block.hash,
                               cosignatures=[serde.cosig_to_msg(c) for c in cosigs])
    for peer in peers:
        try:
            with transport.open_channel(peer) as channel:
                fledger_pb2_grpc.SuperNodeStub(channel).CommitBlock(request, timeout=DEADLINES.block)
        except grpc.RpcError as exc:
            log.warning("peer %s did not commit block %d: %s", peer, header.height, transport.rpc_error_text(exc))
    ledger.add_cosignatures(header.height, cosigs).result()
    return cosigs


def progress_msg(report: RoundReport | None, round: int, message: str) -> TrainProgressMsg:
    """A TrainProgress for a finished round (or, without a report, a note about ``round``)."""
    if report is None:
        return TrainProgressMsg(round=round, message=message)
    block = report.block
    return TrainProgressMsg(round=report.round, height=block.header.height, block_hash=block.hash,
                            participants=report.participants, failures=len(report.failures),
                            metrics=serde.metrics_to_msg({k: v for k, v in report.metrics.items() if math.isfinite(v)}),
                            message="; ".join(f"{n[:12]}: {why}" for n, why in report.failures[:3]) or message)


class SuperNode:
    """An SN process: serves Registry (when entry), SuperNode and Admin; non-entry SNs join the entry and sync.

    With a ``cfg`` the entry writes the genesis block from the run's seeded initial model when its chain is
    empty; without one (tests of the bare network layer) it waits for a genesis made by someone else.
    """

    def __init__(self, key: NodeKey, ledger: Ledger, listen: str, entry: str | None = None,
                 advertise_host: str = "127.0.0.1", capacity: int = 0, heartbeat_interval: float = 2.0,
                 missed_beats: int = 3, cfg: Config | None = None):
        self.key, self.ledger, self.entry = key, ledger, entry
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self._make_genesis = cfg is not None and entry is None
        self.cfg = cfg or Config()
        self.ctx = RunContext(self.cfg)
        self.registry = SuperNodeRegistry(heartbeat_interval, missed_beats) if entry is None else None
        self.edges = Membership(heartbeat_interval, missed_beats, capacity=capacity, kind="edge node")
        self.server, self.port = transport.create_server(listen, services=SERVICES)
        self.address = f"{advertise_host}:{self.port}"
        self.servicer = SuperNodeServicer(ledger, key, self.edges, self.local_partial)
        self._round_lock = threading.Lock()
        self.coordinator: Coordinator | None = None
        self.trainer: Trainer | None = None
        if entry is None:
            self.coordinator = Coordinator(ledger, self.ctx, self.local_partial, self._peer_members, self.all_edges,
                                           lambda peers, block, records, blob:
                                           propose_and_commit(ledger, peers, block, records, blob))
            self.trainer = Trainer(self.coordinator, ledger, self.cfg.rounds, progress_msg)
        fledger_pb2_grpc.add_SuperNodeServicer_to_server(self.servicer, self.server)
        fledger_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self), self.server)
        if self.registry is not None:
            fledger_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(self.registry), self.server)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._membership_loop, name="sn-heartbeat", daemon=True)
        self._registered = False

    @property
    def registry_address(self) -> str:
        return self.entry or self.address

    def start(self) -> None:
        if self._make_genesis and self.ledger.tip is None and self.coordinator is not None:
            self.coordinator.genesis()
        if self.registry is not None:   # registered here, not earlier: genesis may outlast a heartbeat timeout
            self.registry.register(self.key.node_id, self.key.public_hex, self.address, capacity=self.capacity)
        self.server.start()
        self._thread.start()
        log.info("super node %s serving on %s (%s)", self.key.node_id, self.address,
                 "entry" if self.registry else f"entry {self.entry}")

    def stop(self, grace: float | None = 2.0) -> None:
        if self.trainer is not None:
            self.trainer.pause()
            self.trainer.join(timeout=60)
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.stop(grace).wait()
        self.ledger.flush()

    def peers(self) -> list[str]:
        """Addresses of the other live SNs, as the entry lists them (raises grpc.RpcError)."""
        with transport.open_channel(self.registry_address) as channel:
            listed = fledger_pb2_grpc.RegistryStub(channel).ListSuperNodes(EmptyMsg(), timeout=DEADLINES.query)
        return [m.info.address for m in listed.members if m.info.node_id != self.key.node_id]

    def _peer_members(self) -> list[tuple[str, str]]:
        """(node id, address) of the other live SNs."""
        if self.registry is not None:
            return [(m.node_id, m.address) for m in self.registry.members() if m.node_id != self.key.node_id]
        with transport.open_channel(self.registry_address) as channel:
            listed = fledger_pb2_grpc.RegistryStub(channel).ListSuperNodes(EmptyMsg(), timeout=DEADLINES.query)
        return [(m.info.node_id, m.info.address) for m in listed.members if m.info.node_id != self.key.node_id]

    def all_edges(self) -> list[EdgeRef]:
        """Every live edge node: this SN's own and those each peer SN lists (unreachable peers are skipped)."""
        edges = self.servicer.edge_refs()
        peers = self._peer_members()
        sn_ids = {self.key.node_id, *(node_id for node_id, _ in peers)}
        for node_id, address in peers:
            try:
                with transport.open_channel(address) as channel:
                    listed = fledger_pb2_grpc.AdminStub(channel).ListNodes(EmptyMsg(), timeout=DEADLINES.query)
            except grpc.RpcError as exc:
                log.warning("cannot list the edge nodes of %s: %s", node_id, transport.rpc_error_text(exc))
                continue
            edges += [EdgeRef(m.info.node_id, m.info.address) for m in listed.members if m.info.node_id not in sn_ids]
        return sorted(edges, key=lambda e: e.node_id)

    def local_partial(self, round: int, base_height: int, base_hash: str) -> Partial:
        """Train this SN's edge nodes for ``round`` on the model at ``base_height``; refuse stale rounds."""
        if not self._round_lock.acquire(blocking=False):
            raise StaleRoundError(f"round {round} refused: this super node is already training a round")
        try:
            tip = self.ledger.tip
            if tip is not None and round <= tip.header.round:
                raise StaleRoundError(f"round {round} is stale: this node's head closed round {tip.header.round}")
            if (tip is None or tip.header.height < base_height) and self.entry is not None:
                sync.sync_from(self.ledger, self.entry)   # behind the proposer: catch up first
                tip = self.ledger.tip
            if tip is None or tip.header.height != base_height or tip.header.model_hash != base_hash:
                raise StaleRoundError(f"round {round} starts from block {base_height} (model {base_hash[:16]}), "
                                      f"which is not this node's head")
            self.ledger.flush()
            weights = self.ledger.load_weights(base_height)
            partial = train_partial(self.key.node_id, round, weights, self.servicer.edge_refs(), self.ctx.strategy)
            log.info("round %d: partial of %d samples from %d edge(s), %d failure(s)", round, partial.samples,
                     len(partial.records), len(partial.failures))
            return partial
        finally:
            self._round_lock.release()

    def save_model(self, path: str | None = None) -> tuple[Path, str]:
        """Write the head model as a ``torch.load(path, weights_only=True)``-able state dict; (path, model hash)."""
        import torch

        tip = self.ledger.tip
        if tip is None:
            raise UnknownNodeError("the chain is empty; there is no model to save")
        self.ledger.flush()
        weights = self.ledger.load_weights(tip.header.height)
        digest = model_hash(weights)
        root = self.ledger.checkpoint_path.parent if self.ledger.checkpoint_path else Path(self.cfg.data_root)
        target = Path(path) if path else root / f"model-round{tip.header.round:04d}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, target)
        log.info("saved model %s of block %d to %s", digest[:16], tip.header.height, target)
        return target, digest

    def evaluate(self) -> EvalReplyMsg:
        """The head model on the global test set and, for FedPer (or eval_local), on every edge node's split."""
        tip = self.ledger.tip
        if tip is None:
            raise UnknownNodeError("the chain is empty; there is no model to evaluate")
        self.ledger.flush()
        weights = self.ledger.load_weights(tip.header.height)
        reply = EvalReplyMsg()
        glob = self.ctx.evaluate_global(weights)
        if glob:
            reply.loss, reply.accuracy = glob["loss"], glob["accuracy"]
            reply.samples = len(self.ctx.dataset.test_y)
        if self.ctx.personalised:
            for edge in self.all_edges():
                participant = GrpcParticipant(edge.node_id, edge.address)
                try:
                    res = participant.evaluate(weights)
                    reply.edges.append(EdgeEvalMsg(node_id=edge.node_id, loss=res.loss, accuracy=res.accuracy,
                                                   samples=res.samples))
                except RemoteError as exc:
                    reply.edges.append(EdgeEvalMsg(node_id=edge.node_id, error=str(exc)))
                finally:
                    participant.close()
            accs = [e.accuracy for e in reply.edges if not e.error and e.samples > 0]
            if accs:
                reply.edge_accuracy_mean = float(np.mean(accs))
                reply.edge_accuracy_min, reply.edge_accuracy_max = min(accs), max(accs)
        return reply

    def _membership_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._beat()
            except grpc.RpcError as exc:
                log.warning("membership: %s", transport.rpc_error_text(exc))
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self._registered = False
            except (BadRequestError, StaleRoundError) as exc:
                log.error("sync from the entry failed: %s", exc)
            self._stop.wait(self.heartbeat_interval)

    def _beat(self) -> None:
        if self.registry is not None:   # the entry records its own liveness and load directly
            self.registry.heartbeat(self.key.node_id, load=len(self.edges))
            return
        with transport.open_channel(str(self.entry)) as channel:
            stub = fledger_pb2_grpc.RegistryStub(channel)
            if not self._registered:
                stub.RegisterSuperNode(NodeInfoMsg(node_id=self.key.node_id, public_key=self.key.public_hex,
                                                   address=self.address, capacity=self.capacity),
                                       timeout=DEADLINES.register)
                self._registered = True
                sync.sync_from(self.ledger, str(self.entry))   # late joiner: catch up with full verification
            stub.Heartbeat(HeartbeatRequestMsg(node_id=self.key.node_id, load=len(self.edges)),
                           timeout=DEADLINES.heartbeat)
