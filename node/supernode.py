"""The super node (SN) process: wires the Registry (entry), SuperNode and Admin services over its ledger, keeps its
membership alive, trains its edge nodes' share of each round and (on the entry) runs the rounds."""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Collection
from pathlib import Path

import grpc
import numpy as np

from chain.keys import NodeKey
from chain.tensors import model_hash
from config import Config
from node import sync, transport
from node.admin import AdminServicer, progress_msg
from node.consensus import propose_and_commit
from node.context import RunContext
from node.coordinator import Coordinator, EdgeRef, Partial, train_partial
from node.errors import BadRequestError, StaleRoundError, UnknownNodeError
from node.ledger import Ledger
from node.options import DEADLINES
from node.proxy import GrpcParticipant, RemoteError
from node.registry import Membership, SuperNodeRegistry
from node.sn_services import RegistryServicer, SuperNodeServicer
from node.trainer import Trainer
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import EdgeEval as EdgeEvalMsg
from proto.fledger_pb2 import EvalReply as EvalReplyMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import ListRequest as ListRequestMsg
from proto.fledger_pb2 import MemberEntry as MemberEntryMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg

log = logging.getLogger(__name__)

SERVICES = ("fledger.v1.Registry", "fledger.v1.SuperNode", "fledger.v1.Admin")

__all__ = ["SuperNode", "propose_and_commit"]


class SuperNode:
    """An SN process: serves Registry (when entry), SuperNode and Admin; non-entry SNs join the entry and sync.

    With a ``cfg`` the entry writes the genesis block from the run's seeded initial model when its chain is
    empty; without one (tests of the bare network layer) it waits for a genesis made by someone else.
    """

    def __init__(self, key: NodeKey, ledger: Ledger, listen: str, entry: str | None = None,
                 advertise_host: str = "127.0.0.1", advertise_port: int | None = None,
                 capacity: int = 0, heartbeat_interval: float = 2.0,
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
        self.address = f"{advertise_host}:{advertise_port or self.port}"
        self.servicer = SuperNodeServicer(ledger, key, self.edges, self.local_partial)
        self.registry_servicer = RegistryServicer(self.registry, key.node_id) if self.registry is not None else None
        self._round_lock = threading.Lock()
        self.coordinator: Coordinator | None = None
        self.trainer: Trainer | None = None
        if entry is None:
            self.coordinator = Coordinator(ledger, self.ctx, self.local_partial, self._peer_members, self.all_edges,
                                           functools.partial(propose_and_commit, ledger))
            self.trainer = Trainer(self.coordinator, ledger, self.cfg.rounds, progress_msg)
        fledger_pb2_grpc.add_SuperNodeServicer_to_server(self.servicer, self.server)
        fledger_pb2_grpc.add_AdminServicer_to_server(AdminServicer(self), self.server)
        if self.registry_servicer is not None:
            fledger_pb2_grpc.add_RegistryServicer_to_server(self.registry_servicer, self.server)
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
                 "entry" if self.registry is not None else f"entry {self.entry}")

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
        return [address for _, address in self._peer_members()]

    def _supernode_entries(self, include_dead: bool = False) -> list[MemberEntryMsg]:
        """The SNs the entry lists (raises grpc.RpcError when a non-entry SN cannot reach it)."""
        if self.registry_servicer is not None:
            return self.registry_servicer.supernode_entries(include_dead)
        with transport.open_channel(self.registry_address) as channel:
            return list(fledger_pb2_grpc.RegistryStub(channel).ListSuperNodes(
                ListRequestMsg(include_dead=include_dead), timeout=DEADLINES.query).members)

    def _peer_members(self) -> list[tuple[str, str]]:
        """(node id, address) of the other live SNs."""
        return [(m.info.node_id, m.info.address) for m in self._supernode_entries()
                if m.info.node_id != self.key.node_id]

    def _edge_entries(self, node_id: str, address: str, include_dead: bool) -> list[MemberEntryMsg]:
        """The edge nodes of one SN (this one locally, a peer through ListEdges; raises grpc.RpcError)."""
        if node_id == self.key.node_id:
            return self.servicer.edge_entries(include_dead)
        with transport.open_channel(address) as channel:
            return list(fledger_pb2_grpc.SuperNodeStub(channel).ListEdges(
                ListRequestMsg(include_dead=include_dead), timeout=DEADLINES.query).members)

    def all_edges(self) -> list[EdgeRef]:
        """Every live edge node: this SN's own and those each peer SN lists (unreachable peers are skipped)."""
        edges = self.servicer.edge_refs()
        for node_id, address in self._peer_members():
            try:
                listed = self._edge_entries(node_id, address, include_dead=False)
            except grpc.RpcError as exc:
                log.warning("cannot list the edge nodes of %s: %s", node_id, transport.rpc_error_text(exc))
                continue
            edges += [EdgeRef.from_entry(m) for m in listed if m.alive and m.parent_id == node_id]
        return sorted(edges, key=lambda e: e.node_id)

    def network_view(self) -> list[MemberEntryMsg]:
        """getSN(): every SN the entry knows (dead ones too), each live one followed by its edge nodes (dead
        ones too). A non-entry SN that cannot reach the entry lists itself and its own edges."""
        try:
            sns = self._supernode_entries(include_dead=True)
        except grpc.RpcError as exc:
            log.warning("cannot list the super nodes at the entry: %s", transport.rpc_error_text(exc))
            sns = []
        if not any(m.info.node_id == self.key.node_id for m in sns):
            sns.append(MemberEntryMsg(info=NodeInfoMsg(node_id=self.key.node_id, public_key=self.key.public_hex,
                                                       address=self.address, capacity=self.capacity),
                                      load=len(self.edges), alive=True,
                                      role="entry" if self.registry is not None else "supernode"))
        view = []
        for sn in sns:
            view.append(sn)
            if not sn.alive:
                continue
            try:
                view += self._edge_entries(sn.info.node_id, sn.info.address, include_dead=True)
            except grpc.RpcError as exc:
                log.warning("cannot list the edge nodes of %s: %s", sn.info.node_id, transport.rpc_error_text(exc))
        return view

    def local_partial(self, round: int, base_height: int, base_hash: str,
                      selected: Collection[str] | None = None) -> Partial:
        """Train this SN's edge nodes (those of them in ``selected``, when given) for ``round`` on the model at
        ``base_height``; refuse stale rounds."""
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
            partial = train_partial(self.key.node_id, round, weights, self.servicer.edge_refs(), self.ctx.strategy,
                                    selected)
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
