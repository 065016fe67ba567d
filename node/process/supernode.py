"""The super node process: its ledger and SuperNodeCore behind the Registry (entry), SuperNode and Admin services,
its membership loop, and (on the entry) the coordinator and its training jobs."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chain.keys import node_id_for
from chain.verify import VerifyReport
from config import Config
from node.engine.coordinator import Coordinator
from node.engine.errors import BadRequestError, NetError, NotFoundError, PreconditionError
from node.engine.jobs import Progress, TrainingJobs, TrainJob
from node.engine.membership import Member, Membership, SuperNodeRegistry, check_node_id
from node.engine.supernode import SuperNodeCore
from node.engine.sync import sync_from
from node.engine.types import Base, MembershipResult, Peer
from node.engine.views import BlockView, EdgeEval, EvalReport, MemberView, NodeStatus
from node.ledger import Ledger
from node.process.admission import Admissions
from node.rpc import transport
from node.rpc.clients import AnyEdges, GrpcPeer, RegistryClient, RemoteEdges
from node.rpc.security import Authorizer
from node.rpc.services import add_enrollment_service, add_supernode_services
from node.run import RunContext
from node.security.pki import TlsCredentials
from node.security.tokens import TokenStore

if TYPE_CHECKING:
    from node.process.secure import EntrySecurity

log = logging.getLogger(__name__)

SERVICES = ("fledger.v1.Registry", "fledger.v1.SuperNode", "fledger.v1.Admin")


class SuperNode:
    """A super node: serves Registry (when entry), SuperNode and Admin; a non-entry one joins the entry and syncs.

    The entry writes the genesis block from the run's seeded initial model when its chain is empty and ``genesis``
    is true (tests of the bare network pass false and make their own), and then admits every super node that
    registers to the validator set by a membership block (``Admissions``); ``remove_supernode`` takes one out.
    """

    def __init__(self, ledger: Ledger, listen: str, cfg: Config, entry: str | None = None,
                 advertise_host: str = "127.0.0.1", advertise_port: int | None = None, capacity: int = 0,
                 heartbeat_interval: float = 2.0, missed_beats: int = 3, genesis: bool = True,
                 security: TlsCredentials | None = None, entry_security: EntrySecurity | None = None,
                 join_listen: str | None = None):
        self.ledger, self.key, self.entry, self.cfg = ledger, ledger.key, entry, cfg
        # Secure mode: this node's certificate (the entry's comes with its CA, tokens and revocations).
        self.entry_security = entry_security
        self.security = entry_security.credentials if entry_security is not None else security
        self.capacity = capacity
        self.heartbeat_interval = heartbeat_interval
        self.ctx = RunContext(cfg)
        self.registry = SuperNodeRegistry(heartbeat_interval, missed_beats) if entry is None else None
        self.registry_client = RegistryClient(entry, security=self.security) if entry is not None else None
        self.edges = Membership(heartbeat_interval, missed_beats, capacity=capacity, kind="edge node")
        self.edges.sample_limit = self._training_set_size
        self.server, self.port = transport.create_server(listen, services=SERVICES, security=self.security)
        self.address = f"{advertise_host}:{advertise_port or self.port}"
        self.join_port: int | None = None
        if entry_security is not None:   # the plaintext join port serves Enrollment only (the authorizer's rule)
            self.join_port = self.server.add_insecure_port(join_listen or f"{listen.rpartition(':')[0]}:0")
            if self.join_port == 0:
                raise OSError(f"cannot bind the join port {join_listen}; is it in use?")
        self.core = SuperNodeCore(ledger, RemoteEdges(self.edges, self.security), upstream=self._entry_peer)
        self.coordinator: Coordinator | None = None
        self.jobs: TrainingJobs | None = None
        if entry is None:
            self.coordinator = Coordinator(self.ctx, self.core, self.peers, AnyEdges(self.security))
            self.jobs = TrainingJobs(self.coordinator, cfg.rounds)
        self._make_genesis = genesis and entry is None
        add_supernode_services(self.server, self.core, self.edges, self, self.registry,
                               authorize=self._authorizer())
        if entry_security is not None:
            add_enrollment_service(self.server, entry_security.enroller, authorize=entry_security.authorizer)
        self._stop = threading.Event()
        # The entry admits registering super nodes to the validator set by membership blocks, in the background;
        # not on a bare network (genesis false), whose blocks its tests make by hand.
        self.admissions = Admissions(self.coordinator, self.registry, self._peer_of, self._stop, heartbeat_interval) \
            if self._make_genesis and self.coordinator is not None and self.registry is not None else None
        self._thread = threading.Thread(target=self._membership_loop, name="sn-heartbeat", daemon=True)
        self._registered = False

    def _training_set_size(self) -> int:
        """No edge node's share holds more samples than the run's training set (loaded on the first registration)."""
        return len(self.ctx.dataset.train_y)

    def _authorizer(self) -> Authorizer | None:
        if self.entry_security is not None:
            return self.entry_security.authorizer
        return Authorizer() if self.security is not None else None

    @property
    def secure(self) -> bool:
        return self.security is not None

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
        if self.admissions is not None:
            self.admissions.join(timeout=30)
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
        return [GrpcPeer(m.node_id, m.address, security=self.security)
                for m in self.supernodes() if m.node_id != self.key.node_id]

    def _peer_of(self, member: Member) -> Peer:
        return GrpcPeer(member.node_id, member.address, security=self.security)

    def _entry_peer(self) -> Peer | None:
        return GrpcPeer("entry", self.entry, security=self.security) if self.entry is not None else None

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
                view += GrpcPeer(sn.node_id, sn.address, security=self.security).members(include_dead=True)
            except NetError as exc:
                log.warning("cannot list the edge nodes of %s: %s", sn.node_id, exc)
        return view

    # ---- AdminBackend ---------------------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        jobs, head = self.jobs, self.ledger.head
        return NodeStatus(self.key.node_id, "entry" if self.registry is not None else "supernode", self.core.head(),
                          len(self.edges), len(self.registry) if self.registry is not None else 0,
                          bool(jobs and jobs.training), bool(jobs and jobs.pause_requested),
                          jobs.current_round if jobs else (head.round if head else 0),
                          validators=tuple(sorted(node_id_for(k) for k in self.ledger.validators)))

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
        """Write the head model as a ``torch.load(path, weights_only=True)``-able state dict; (path, model hash).
        Only into DATA_ROOT/models/ (``files.model_path``): BadRequestError for any other place or name."""
        import torch

        from node.process.files import model_path, write_model

        base = self._head_model("save")
        head = self.ledger.head
        assert head is not None
        root = self.ledger.checkpoint_path.parent if self.ledger.checkpoint_path else Path(self.cfg.data_root)
        target = model_path(root, path, f"model-round{head.round:04d}.pt")
        state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in base.weights.items()}
        write_model(root, target, lambda handle: torch.save(state, handle))
        log.info("saved model %s of block %d to %s", base.model_hash[:16], base.height, target)
        return target, base.model_hash

    def evaluate(self) -> EvalReport:
        """The head model on the global test set and, for FedPer (or eval_local), on every edge node's split."""
        base = self._head_model("evaluate")
        glob = self.ctx.evaluate_global(base.weights)
        edges: list[EdgeEval] = []
        if self.ctx.personalised:
            directory = AnyEdges(self.security)
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

    def remove_supernode(self, node_id: str) -> MembershipResult:
        """Remove validator ``node_id`` by a membership block (a strict majority of the current set must co-sign
        it, the dead among them counted), then drop it from the registry; it is not admitted again."""
        if self.coordinator is None or self.registry is None or self.admissions is None:
            raise PreconditionError(f"validators are removed by the entry super node ({self.entry}); ask there")
        check_node_id(node_id, "the super node's id")
        if node_id == self.key.node_id:
            raise PreconditionError(f"super node {node_id} is the entry: it proposes every block and cannot be "
                                    "removed")
        keys = {node_id_for(k): k for k in self.ledger.validators}
        if node_id not in keys:
            raise NotFoundError(f"super node {node_id} is not a validator; validators: {', '.join(sorted(keys))}")
        self.admissions.exclude(keys[node_id])
        result = self.coordinator.change_validators("remove", keys[node_id], node_id)
        self.registry.drop(node_id)
        if self.entry_security is not None:   # its certificate stays valid until it expires: refuse it by id
            self.entry_security.revocations.add(node_id)
        log.info("super node %s removed from the validators in block %d", node_id, result.height)
        return result

    def _tokens(self) -> TokenStore:
        if self.entry_security is None:
            raise PreconditionError("join tokens exist only on the entry of a secure network (start it with "
                                    "--secure)" if self.registry is not None else
                                    f"join tokens are kept by the entry ({self.entry}); ask there")
        return self.entry_security.tokens

    def tokens(self) -> dict[str, str]:
        tokens = self._tokens()
        return {role: tokens.current(role).text for role in ("supernode", "edge")}

    def rotate_token(self, role: str) -> dict[str, str]:
        if role not in ("supernode", "edge"):
            raise BadRequestError("rotateToken takes \"supernode\" or \"edge\"")
        self._tokens().rotate(role)
        log.info("the %s join token was rotated; the old one is revoked", role)
        return self.tokens()

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
            if self.admissions is not None:
                self.admissions.poll()
            return
        client = self.registry_client
        assert client is not None and self.entry is not None
        if not self._registered:
            client.register_supernode(MemberView(self.key.node_id, self.key.public_hex, self.address, "supernode",
                                                 True, capacity=self.capacity))
            self._registered = True
            # a late joiner catches up, verifying every block
            sync_from(self.ledger, GrpcPeer("entry", self.entry, security=self.security))
        client.heartbeat(self.key.node_id, load=len(self.edges))
        if self.key.public_hex not in self.ledger.validators:   # no commits come here: follow the chain by syncing
            self.core.catch_up()

