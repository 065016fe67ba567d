"""The super node process: its ledger and SuperNodeCore behind the Registry (entry), SuperNode and Admin services,
its membership loop, and (on the entry) the coordinator and its training jobs."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from chain.verify import VerifyReport
from config import Config
from node.engine.coordinator import Coordinator
from node.engine.errors import NetError, NotFoundError, PreconditionError
from node.engine.jobs import Progress, TrainingJobs, TrainJob
from node.engine.membership import Membership, SuperNodeRegistry
from node.engine.supernode import SuperNodeCore
from node.engine.sync import sync_from
from node.engine.types import Base, Peer
from node.engine.views import BlockView, EdgeEval, EvalReport, MemberView, NodeStatus
from node.ledger import Ledger
from node.rpc import transport
from node.rpc.clients import AnyEdges, GrpcPeer, RegistryClient, RemoteEdges
from node.rpc.services import add_supernode_services
from node.run import RunContext

log = logging.getLogger(__name__)

SERVICES = ("fledger.v1.Registry", "fledger.v1.SuperNode", "fledger.v1.Admin")


class SuperNode:
    """A super node: serves Registry (when entry), SuperNode and Admin; a non-entry one joins the entry and syncs.

    The entry writes the genesis block from the run's seeded initial model when its chain is empty and ``genesis``
    is true (tests of the bare network pass false and make their own).
    """

    def __init__(self, ledger: Ledger, listen: str, cfg: Config, entry: str | None = None,
                 advertise_host: str = "127.0.0.1", advertise_port: int | None = None, capacity: int = 0,
                 heartbeat_interval: float = 2.0, missed_beats: int = 3, genesis: bool = True):
        self.ledger, self.key, self.entry, self.cfg = ledger, ledger.key, entry, cfg
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self.ctx = RunContext(cfg)
        self.registry = SuperNodeRegistry(heartbeat_interval, missed_beats) if entry is None else None
        self.registry_client = RegistryClient(entry) if entry is not None else None
        self.edges = Membership(heartbeat_interval, missed_beats, capacity=capacity, kind="edge node")
        self.server, self.port = transport.create_server(listen, services=SERVICES)
        self.address = f"{advertise_host}:{advertise_port or self.port}"
        self.core = SuperNodeCore(ledger, RemoteEdges(self.edges), upstream=self._entry_peer)
        self.coordinator: Coordinator | None = None
        self.jobs: TrainingJobs | None = None
        if entry is None:
            self.coordinator = Coordinator(self.ctx, self.core, self.peers, AnyEdges())
            self.jobs = TrainingJobs(self.coordinator, cfg.rounds)
        self._make_genesis = genesis and entry is None
        add_supernode_services(self.server, self.core, self.edges, self, self.registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._membership_loop, name="sn-heartbeat", daemon=True)
        self._registered = False

    def start(self) -> None:
        if self._make_genesis and self.ledger.head is None and self.coordinator is not None:
            self.coordinator.genesis()
        if self.registry is not None:   # registered here, not earlier: genesis may outlast a heartbeat timeout
            self.registry.register(self.key.node_id, self.key.public_hex, self.address, capacity=self.capacity)
        self.server.start()
        self._thread.start()
        log.info("super node %s serving on %s (%s)", self.key.node_id, self.address,
                 "entry" if self.registry is not None else f"entry {self.entry}")

    def stop(self, grace: float | None = 2.0) -> None:
        if self.jobs is not None:
            self.jobs.pause()
            self.jobs.join(timeout=60)
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.stop(grace).wait()
        self.ledger.close()

    # ---- who the other super nodes are ----------------------------------------------------------------------

    def supernodes(self, include_dead: bool = False) -> list[MemberView]:
        """The super nodes the entry lists (raises NetError when a non-entry one cannot reach it)."""
        if self.registry is not None:
            return [MemberView(m.node_id, m.public_key, m.address, "entry" if m.node_id == self.key.node_id
                               else "supernode", alive, silent, load=m.load, capacity=m.capacity)
                    for m, alive, silent in self.registry.listing(include_dead)]
        assert self.registry_client is not None
        return self.registry_client.supernodes(include_dead)

    def peers(self) -> list[Peer]:
        """The other live super nodes, as peers of a round."""
        return [GrpcPeer(m.node_id, m.address) for m in self.supernodes() if m.node_id != self.key.node_id]

    def _entry_peer(self) -> Peer | None:
        return GrpcPeer("entry", self.entry) if self.entry is not None else None

    def _own_edges(self, include_dead: bool) -> list[MemberView]:
        return [MemberView(m.node_id, m.public_key, m.address, "edge", alive, silent, self.key.node_id,
                           samples=m.samples, share=m.share)
                for m, alive, silent in self.edges.listing(include_dead)]

    def network_view(self) -> list[MemberView]:
        """getSN(): every super node the entry knows (dead ones too), each live one followed by its edge nodes (dead
        ones too). A non-entry super node that cannot reach the entry lists itself and its own edges."""
        try:
            sns = self.supernodes(include_dead=True)
        except NetError as exc:
            log.warning("cannot list the super nodes at the entry: %s", exc)
            sns = []
        if not any(m.node_id == self.key.node_id for m in sns):
            sns.append(MemberView(self.key.node_id, self.key.public_hex, self.address,
                                  "entry" if self.registry is not None else "supernode", True,
                                  load=len(self.edges), capacity=self.capacity))
        view = []
        for sn in sns:
            view.append(sn)
            if not sn.alive:
                continue
            if sn.node_id == self.key.node_id:
                view += self._own_edges(include_dead=True)
                continue
            try:
                view += GrpcPeer(sn.node_id, sn.address).members(include_dead=True)
            except NetError as exc:
                log.warning("cannot list the edge nodes of %s: %s", sn.node_id, exc)
        return view

    # ---- AdminBackend ---------------------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        jobs, head = self.jobs, self.ledger.head
        return NodeStatus(self.key.node_id, "entry" if self.registry is not None else "supernode", self.core.head(),
                          len(self.edges), len(self.registry) if self.registry is not None else 0,
                          bool(jobs and jobs.training), bool(jobs and jobs.pause_requested),
                          jobs.current_round if jobs else (head.round if head else 0))

    def _jobs(self, what: str) -> TrainingJobs:
        if self.jobs is None:
            raise PreconditionError(f"training runs on the entry super node ({self.entry}); {what} there")
        return self.jobs

    def start_training(self, rounds: int) -> tuple[TrainJob, bool]:
        jobs = self._jobs("connect the console")
        if self.ledger.head is None:
            raise PreconditionError("the chain has no genesis block yet")
        return jobs.start(rounds)

    def follow(self, job: TrainJob, alive: Callable[[], bool]) -> Iterator[Progress]:
        return self._jobs("follow it").follow(job, alive)

    def pause(self) -> None:
        self._jobs("pause it").pause()

    def _head_model(self, what: str) -> Base:
        if self.ledger.head is None:
            raise NotFoundError(f"the chain is empty; there is no model to {what}")
        return self.core.base()

    def save_model(self, path: str | None = None) -> tuple[Path, str]:
        """Write the head model as a ``torch.load(path, weights_only=True)``-able state dict; (path, model hash)."""
        import torch

        base = self._head_model("save")
        head = self.ledger.head
        assert head is not None
        root = self.ledger.checkpoint_path.parent if self.ledger.checkpoint_path else Path(self.cfg.data_root)
        target = Path(path) if path else root / f"model-round{head.round:04d}.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in base.weights.items()}, target)
        log.info("saved model %s of block %d to %s", base.model_hash[:16], base.height, target)
        return target, base.model_hash

    def evaluate(self) -> EvalReport:
        """The head model on the global test set and, for FedPer (or eval_local), on every edge node's split."""
        base = self._head_model("evaluate")
        glob = self.ctx.evaluate_global(base.weights)
        edges: list[EdgeEval] = []
        if self.ctx.personalised:
            directory = AnyEdges()
            refs = (self.coordinator.all_edges(self.peers()) if self.coordinator is not None
                    else self.core.edges())
            for ref in refs:
                participant = directory.connect(ref, base)
                try:
                    res = participant.evaluate(base.weights)
                    edges.append(EdgeEval(ref.node_id, res.loss, res.accuracy, res.samples))
                except (RuntimeError, NetError) as exc:
                    edges.append(EdgeEval(ref.node_id, error=str(exc)))
                finally:
                    directory.release(participant)
        accs = [e.accuracy for e in edges if not e.error and e.samples > 0]
        return EvalReport(glob.get("loss", 0.0), glob.get("accuracy", 0.0),
                          len(self.ctx.dataset.test_y) if glob else 0, edges,
                          float(np.mean(accs)) if accs else 0.0, min(accs, default=0.0), max(accs, default=0.0))

    def block(self, height: int) -> BlockView:
        head = self.ledger.head
        if head is None or height > head.height:
            raise NotFoundError(f"no block at height {height}")
        block, records = self.ledger.get_block(height)
        return BlockView(block, records)

    def verify_chain(self) -> VerifyReport:
        return self.ledger.verify_chain()

    # ---- membership -----------------------------------------------------------------------------------------

    def _membership_loop(self) -> None:
        """Heartbeat (and register, and catch up) until stopped; no error ends it, each is logged."""
        while not self._stop.is_set():
            try:
                self._beat()
            except NotFoundError as exc:
                log.warning("membership: %s; registering again", exc)
                self._registered = False
            except NetError as exc:
                log.warning("membership: %s", exc)
            except Exception:   # a storage failure during catch-up, or a bug: log it, keep heartbeating
                log.exception("membership: heartbeat failed; retrying in %.1f s", self.heartbeat_interval)
            self._stop.wait(self.heartbeat_interval)

    def _beat(self) -> None:
        if self.registry is not None:   # the entry records its own liveness and load directly
            self.registry.heartbeat(self.key.node_id, load=len(self.edges))
            return
        client = self.registry_client
        assert client is not None and self.entry is not None
        if not self._registered:
            client.register_supernode(MemberView(self.key.node_id, self.key.public_hex, self.address, "supernode",
                                                 True, capacity=self.capacity))
            self._registered = True
            sync_from(self.ledger, GrpcPeer("entry", self.entry))   # late joiner: catch up, verifying every block
        client.heartbeat(self.key.node_id, load=len(self.edges))

