"""The super node process: its ledger and SuperNodeCore behind the Registry (entry), SuperNode and Admin services,
its membership loop, and (on the entry) the coordinator and its training jobs."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from chain.keys import node_id_for
from chain.tensors import encode_weights
from chain.verify import VerifyReport
from config import Config
from node.engine.consensus import ask_all
from node.engine.coordinator import Coordinator
from node.engine.election import ConsensusState, proposer_of, turn_after
from node.engine.errors import BadRequestError, NetError, NotFoundError, PreconditionError, UnavailableError
from node.engine.jobs import Progress, TrainingJobs, TrainJob, healthy_ledger
from node.engine.membership import Member, Membership, SuperNodeRegistry, check_node_id
from node.engine.pacing import Pacer
from node.engine.supernode import SuperNodeCore
from node.engine.types import Base, MembershipResult, Peer
from node.engine.views import BlockView, EdgeEval, EvalReport, MemberView, NodeStatus
from node.ledger import Ledger
from node.process.admission import Admissions
from node.rpc import transport
from node.rpc.clients import AnyEdges, GrpcPeer, RegistryClient, RemoteEdges
from node.rpc.options import Deadlines, deadlines_for, round_deadline
from node.rpc.security import Authorizer
from node.rpc.services import LocalRegistryServicer, add_enrollment_service, add_supernode_services
from node.run import RunContext, model_name
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
        self.round_s = cfg.round_timeout_s or self._derived_round_s()
        if self.ctx.scenario is not None and cfg.round_timeout_s is None:   # profiled rounds take simulated time
            self.round_s = max(self.round_s, 2 * (self.ctx.scenario.deadline_s or 1800.0))
        self.deadlines: Deadlines = deadlines_for(self.round_s)
        self.registry_client = RegistryClient(entry, security=self.security) if entry is not None else None
        self._known: dict[str, MemberView] = {}   # the super nodes last listed by the entry (followers' peers)
        self.edges = Membership(heartbeat_interval, missed_beats, capacity=capacity, kind="edge node")
        self.edges.sample_limit = self._training_set_size
        self.server, self.port = transport.create_server(listen, services=SERVICES, security=self.security)
        self.address = f"{advertise_host}:{advertise_port or self.port}"
        self.join_port: int | None = None
        if entry_security is not None:   # the plaintext join port serves Enrollment only (the authorizer's rule)
            self.join_port = self.server.add_insecure_port(join_listen or f"{listen.rpartition(':')[0]}:0")
            if self.join_port == 0:
                raise OSError(f"cannot bind the join port {join_listen}; is it in use?")
        state_dir = ledger.checkpoint_path.parent if ledger.checkpoint_path is not None else None
        self.core = SuperNodeCore(ledger, RemoteEdges(self.edges, self.security, self.deadlines),
                                  upstream=self._upstream, state=ConsensusState(state_dir))
        # Every validator can propose (node.engine.election): the entry from the start, another one when it
        # takes over from a proposer that went silent with a training job unfinished.
        self.coordinator: Coordinator = Coordinator(self.ctx, self.core, self.peers,
                                                    AnyEdges(self.security, self.deadlines))
        self.jobs: TrainingJobs = TrainingJobs(self.coordinator, cfg.rounds, retry_for=cfg.retry_for_s,
                                               before_round=healthy_ledger(ledger))
        self._make_genesis = genesis and entry is None
        registry = self.registry if self.registry is not None else LocalRegistryServicer(
            self.core, self.edges, self._me, lambda: list(self._known.values()), entry or "")
        clock = self.ctx.clock()   # a scenario's: this node spends its backbone's time for real
        pacer = Pacer(clock, cfg.shape_links) if clock is not None else None
        add_supernode_services(self.server, self.core, self.edges, self, registry, authorize=self._authorizer(),
                               pacer=pacer)
        if entry_security is not None:
            add_enrollment_service(self.server, entry_security.enroller, authorize=entry_security.authorizer)
        self._stop = threading.Event()
        # The entry admits registering super nodes to the validator set by membership blocks, in the background;
        # not on a bare network (genesis false), whose blocks its tests make by hand.
        self.admissions = Admissions(self.coordinator, self.registry, self._peer_of, self._stop, heartbeat_interval) \
            if self._make_genesis and self.registry is not None else None
        self._thread = threading.Thread(target=self._loop, args=((self._beat,),), name="sn-heartbeat", daemon=True)
        # Healing, catching up and watching the proposer may wait on the store or a peer: never the heartbeats.
        self._recovery = threading.Thread(target=self._loop, args=((self._heal, self._follow, self._watch_proposer),),
                                          name="sn-recovery", daemon=True)
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
        self._recovery.start()
        log.info("super node %s serving on %s (%s)", self.key.node_id, self.address,
                 "entry" if self.registry is not None else f"entry {self.entry}")

    def _derived_round_s(self) -> float:
        """The default round bound (options.round_deadline) from this run's model and data; 10 minutes when the
        dataset cannot be loaded here."""
        try:
            share = len(self.ctx.dataset.train_y) // max(1, self.cfg.partition_count, self.cfg.clients)
            size = len(encode_weights(self.ctx.genesis_weights()))
        except Exception as exc:  # noqa: BLE001 - any failure to load just means no derived bound
            log.warning("cannot derive the round deadline (%s); using 600 s (set --round-timeout)", exc)
            return 600.0
        return round_deadline(model_name(self.cfg), self.cfg.local_epochs, share, size)

    def stop(self, grace: float | None = 2.0) -> None:
        self.jobs.pause()
        self.jobs.join(timeout=self.round_s + 10)
        self._stop.set()
        self._thread.join(timeout=5)
        self._recovery.join(timeout=5)
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
        """The other super nodes, as peers of a round: on the entry the live ones it registered; elsewhere those
        the entry listed, or, while it cannot be reached, those it listed last (the entry among them)."""
        if self.registry is not None:
            members = self.supernodes()
        else:
            try:
                self._remember(self.supernodes(include_dead=True))
            except NetError as exc:
                log.info("the entry cannot list the super nodes (%s); using the last list", exc)
            members = list(self._known.values())
        return [GrpcPeer(m.node_id, m.address, self.deadlines, security=self.security)
                for m in members if m.node_id != self.key.node_id]

    def _me(self) -> MemberView:
        return MemberView(self.key.node_id, self.key.public_hex, self.address,
                          "entry" if self.registry is not None else "supernode", True, load=len(self.edges),
                          capacity=self.capacity)

    def _remember(self, members: list[MemberView]) -> None:
        for member in members:
            if member.node_id != self.key.node_id:
                self._known[member.node_id] = member

    def _peer_of(self, member: Member) -> Peer:
        return GrpcPeer(member.node_id, member.address, self.deadlines, security=self.security)

    def _upstream(self) -> Peer | None:
        """Who to catch up from: the proposer of the view this node follows when it knows its address, else the
        entry (None on the entry while it leads)."""
        proposer = self.core.proposer()
        if proposer is not None and proposer != self.key.node_id:
            known = self._known.get(proposer)
            if known is None and self.registry is not None:
                known = next((m for m in self.supernodes() if m.node_id == proposer), None)
            if known is not None:
                return GrpcPeer(known.node_id, known.address, self.deadlines, security=self.security)
        if self.entry is not None:
            return GrpcPeer("entry", self.entry, self.deadlines, security=self.security)
        return None

    def _own_edges(self, include_dead: bool) -> list[MemberView]:
        return [MemberView(m.node_id, m.public_key, m.address, "edge", alive, silent, self.key.node_id,
                           samples=m.samples, share=m.share)
                for m, alive, silent in self.edges.listing(include_dead)]

    def network_view(self) -> list[MemberView]:
        """getSN(): every super node the entry knows (dead ones too), each live one followed by its edge nodes (dead
        ones too). A non-entry super node that cannot reach the entry lists the super nodes it knew. The super
        nodes are asked in parallel with a short deadline; one that does not answer in time is listed with
        ``unreachable`` set and no edge nodes, so one frozen super node never holds up the answer."""
        try:
            sns = self.supernodes(include_dead=True)
        except NetError as exc:
            log.warning("cannot list the super nodes at the entry: %s", exc)
            sns = list(self._known.values())
        if not any(m.node_id == self.key.node_id for m in sns):
            sns.append(MemberView(self.key.node_id, self.key.public_hex, self.address,
                                  "entry" if self.registry is not None else "supernode", True,
                                  load=len(self.edges), capacity=self.capacity))
        quick = Deadlines(query=min(3.0, self.deadlines.query))
        others = [sn for sn in sns if sn.alive and sn.node_id != self.key.node_id]
        listed: dict[str, list[MemberView] | NetError] = {}
        if others:
            with ThreadPoolExecutor(max_workers=min(16, len(others)), thread_name_prefix="getSN") as pool:
                jobs = {sn.node_id: pool.submit(GrpcPeer(sn.node_id, sn.address, quick, security=self.security)
                                                .members, True) for sn in others}
                for node_id, job in jobs.items():
                    try:
                        listed[node_id] = job.result()
                    except NetError as exc:
                        log.warning("cannot list the edge nodes of %s: %s", node_id, exc)
                        listed[node_id] = exc
        view = []
        for sn in sns:
            if sn.node_id == self.key.node_id:
                view.append(sn)
                view += self._own_edges(include_dead=True)
                continue
            answer = listed.get(sn.node_id)
            if isinstance(answer, NetError):
                view.append(dataclasses.replace(sn, unreachable=f"did not answer in {quick.query:.0f} s: "
                                                                f"{answer.status or 'error'}"))
                continue
            view.append(sn)
            view += answer or []
        return view

    # ---- AdminBackend ---------------------------------------------------------------------------------------

    def status(self) -> NodeStatus:
        jobs = self.jobs
        return NodeStatus(self.key.node_id, "entry" if self.registry is not None else "supernode", self.core.head(),
                          len(self.edges), len(self.registry) if self.registry is not None else 0,
                          jobs.training, jobs.pause_requested, jobs.current_round,
                          validators=tuple(sorted(node_id_for(k) for k in self.ledger.validators)),
                          view=self.core.state.view, proposer=self.core.proposer() or "",
                          ledger_error="" if self.ledger.healthy else self.ledger.health_reason)

    def start_training(self, rounds: int) -> tuple[TrainJob, bool]:
        if self.ledger.head is None:
            raise PreconditionError("the chain has no genesis block yet")
        return self.jobs.start(rounds)

    def follow(self, job: TrainJob, alive: Callable[[], bool]) -> Iterator[Progress]:
        return self.jobs.follow(job, alive)

    def pause(self) -> None:
        self.jobs.pause()

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

    def _loop(self, steps: tuple[Callable[[], None], ...]) -> None:
        """Run ``steps`` every heartbeat interval until stopped (the heartbeat loop: register and heartbeat; the
        recovery loop: heal the ledger, catch up, and take over proposing when the proposer went silent). Each
        step runs whatever the others did, no error ends the loop, and a failure is logged once while it repeats
        (then at DEBUG)."""
        repeated: dict[str, str] = {}
        while not self._stop.is_set():
            for step in steps:
                name = step.__name__.strip("_")
                try:
                    step()
                    if repeated.pop(name, None) is not None:
                        log.info("membership: %s works again", name)
                    continue
                except NotFoundError as exc:
                    self._registered = False
                    message = f"{exc}; registering again"
                except NetError as exc:
                    message = str(exc)
                except Exception as exc:   # a storage failure during catch-up, or a bug: keep going
                    message = f"{name} failed: {exc}"
                    if repeated.get(name) != message:
                        log.exception("membership: %s; retrying in %.1f s", message, self.heartbeat_interval)
                    repeated[name] = message
                    continue
                level = logging.DEBUG if repeated.get(name) == message else logging.WARNING
                log.log(level, "membership: %s", message)
                repeated[name] = message
            self._stop.wait(self.heartbeat_interval)

    def _heal(self) -> None:
        """While the ledger cannot write, say so on the health service (NOT_SERVING: rounds and blocks are refused
        with the reason) and try the store again each beat; once it works, catch up and serve again."""
        if self.ledger.healthy:
            return
        transport.set_serving(self.server, False)
        if not self.ledger.heal():
            raise UnavailableError(f"ledger store still failing: {self.ledger.health_reason}; this super node "
                                   "sits out of rounds until it works")
        transport.set_serving(self.server, True)
        upstream = self._upstream()
        if upstream is not None:
            try:
                added = self.core.catch_up(upstream)
                log.info("ledger store works again: caught up %d block(s); back in rounds", added)
            except NetError as exc:
                log.warning("ledger store works again, but catching up failed: %s", exc)

    def _watch_proposer(self) -> None:
        """Take over proposing (election) when a training job is unfinished, this node can write, and the proposer
        of the view it follows has been silent for one round deadline per turn this node comes after it; a
        validator that itself proposes, or that no job concerns, does nothing."""
        state, head = self.core.state, self.ledger.head
        if self.jobs.training or head is None or state.target_round <= head.round or not self.ledger.healthy:
            return
        validators = self.ledger.validators
        if self.key.public_hex not in validators:
            return
        turn = turn_after(self.key.public_hex, state.view, validators, self.ledger.authority)
        silent = time.monotonic() - self.core.last_activity
        if turn == 0 or silent < turn * self.round_s:
            return
        own = dataclasses.asdict(self.ctx.plan())
        if state.plan and state.plan != own:
            differ = ", ".join(f"{k} {state.plan.get(k)!r} here {v!r}" for k, v in own.items()
                               if state.plan.get(k) != v)
            raise PreconditionError(f"cannot take over the training job: its settings differ from this node's "
                                    f"({differ}); restart this node with the job's settings")
        proposer = proposer_of(state.view, validators, self.ledger.authority)
        proposer_id = node_id_for(proposer) if proposer else "?"
        if self._answers(proposer_id):   # alive and answering: its rounds fail, or wait; taking over won't help
            log.debug("the proposer %s answers; not taking over", proposer_id)
            self.core.heard()
            return
        log.warning("the proposer %s of view %d has been silent for %.0f s with rounds %d-%d to go; taking over",
                    proposer_id, state.view, silent, head.round + 1, state.target_round)
        self.core.heard()   # the next candidate waits a full deadline for this attempt
        self.jobs.start(0, last_round=state.target_round)

    def _follow(self) -> None:
        """Unless this node is proposing, catch up with the highest head among the other super nodes: a node that
        is no validator gets no commits, a validator whose vote was not needed for a majority gets none either,
        and a node back from a crash may have missed blocks proposed by another validator meanwhile."""
        if self.jobs.training:
            return
        peers = self.peers()
        quick = Deadlines(query=min(3.0, self.deadlines.query))
        heads, _ = ask_all([GrpcPeer(p.node_id, p.address, quick, security=self.security)  # type: ignore[attr-defined]
                            for p in peers], lambda peer: peer.head(), "report its head", level=logging.DEBUG)
        head = self.ledger.head
        ahead = [(h.height, node_id) for node_id, h in heads.items()
                 if h is not None and (head is None or h.height > head.height)]
        if ahead:
            best = max(ahead)[1]
            self.core.catch_up(next(p for p in peers if p.node_id == best))

    def _answers(self, node_id: str) -> bool:
        """Whether super node ``node_id`` answers a head query within a few seconds (a dead or frozen one does
        not)."""
        known = self._known.get(node_id)
        if known is None and self.registry is not None:
            known = next((m for m in self.supernodes() if m.node_id == node_id), None)
        if known is None:
            return False
        try:
            GrpcPeer(node_id, known.address, Deadlines(query=3.0), security=self.security).head()
        except NetError:
            return False
        return True

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
            self._registered = True   # a late joiner catches up (every block verified) in the recovery loop
        client.heartbeat(self.key.node_id, load=len(self.edges))
        self._remember(self.supernodes(include_dead=True))   # followers' peers, should the entry go away

