"""The proposer's round, the one round path of the simulator and the network: select edge nodes over every super
node, announce, collect the partials (in-process or over gRPC), combine them, evaluate, build the block, have it
co-signed and committed. The entry super node runs it; the simulator runs it with in-process peers. It also
proposes the membership blocks that change the validator set, never in the middle of a round."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from chain.block import SignedBlock
from chain.keys import node_id_for
from chain.tensors import encoded_size
from chain.updates import EXCLUDED, RecordedUpdate
from chain.validators import VALIDATORS, MembershipChange, MembershipError, apply_change
from chain.verify import VerifiedBlock
from fl.robust import parse_rule
from fl.server import REJECTED, RoundFailed, evaluate_personalised
from node.engine.clock import EmptyRound, idle_s
from node.engine.consensus import ask_all, finalize, take_lead
from node.engine.election import proposer_of
from node.engine.errors import BadRequestError, NetError, PreconditionError
from node.engine.partial import Roster, check_partial, combine, combine_metrics, shared_trainers
from node.engine.receipts import integer_metrics
from node.engine.supernode import SuperNodeCore
from node.engine.types import (
    SIM,
    Announcement,
    Base,
    EdgeDirectory,
    EdgeRef,
    MembershipResult,
    Partial,
    Peer,
    RoundPlan,
    RoundReport,
    share_order,
)
from node.engine.updates import NothingUsable, aggregate_updates, clip_reason
from node.ledger import Ledger
from node.run import RunContext

log = logging.getLogger(__name__)

CLOCK_LOOKBACK = 256   # blocks searched back for the newest simulated time (membership blocks between rounds)
MAX_EXCLUDED = 1000   # the most excluded updates a block lists (a round has at most MAX_PARTICIPANTS on the wire)


class Coordinator:
    """Runs rounds from the proposer over its own super node (``local``) and the other live ones (``peers()``)."""

    def __init__(self, ctx: RunContext, local: SuperNodeCore, peers: Callable[[], Sequence[Peer]],
                 evaluators: EdgeDirectory | None = None, *, wait_durable: bool = True, concurrent: bool = True,
                 client_state: Callable[[], dict[str, bytes] | None] | None = None):
        self.ctx = ctx
        self.local = local
        self.ledger: Ledger = local.ledger
        self.peers = peers                # the other live super nodes
        self.evaluators = evaluators      # reaches any edge node for personalised evaluation (default: local's)
        self.wait_durable = wait_durable  # False: a round without peers does not wait for its block's write
        self.concurrent = concurrent      # ask the super nodes in parallel (remote) or in turn (in-process)
        self.client_state = client_state  # the simulator's per-client state, stored with each block to resume
        self._serial = threading.Lock()   # one block at a time: a round, or a change of the validator set
        self._changes = threading.Condition()   # membership changes waiting for _serial; rounds let them go first
        self._changes_waiting = 0
        self._listing = threading.local()  # .roster: who listed which edge, from this thread's last all_edges
        self.state = local.state          # this validator's view and prepared block (node.engine.election)
        self.target_round = 0             # the running job's last round, announced so any validator can go on
        self._led_view: int | None = None  # the view this node gathered a majority's promises for

    def genesis_params(self, validators: Collection[str] | None = None) -> dict[str, Any]:
        """The genesis block's params: the run's, plus the initial validator set (sorted keys) when one is given;
        without it the genesis proposer alone is the first validator."""
        params: dict[str, Any] = dict(self.ctx.params())
        if validators is not None:
            params[VALIDATORS] = sorted(set(validators))
        return params

    def genesis(self, edges: Sequence[EdgeRef] = (),
                validators: Collection[str] | None = None) -> tuple[SignedBlock, dict[str, float]]:
        """The round-0 block from the seeded initial model, evaluated (when personalised) on ``edges``, and its
        metrics. ``validators`` (public keys, this node's among them) is the initial validator set; by default
        this node alone."""
        weights = self.ctx.genesis_weights()
        metrics = self.evaluate(Base(0, None, weights), edges)
        proposal = self.ledger.build(round=0, algorithm=self.ctx.strategy.name,
                                     params=self.genesis_params(validators),
                                     weights=weights, records=[], metrics=integer_metrics(metrics),
                                     timestamp_ms=self.ctx.timestamp(0))
        durable = self.ledger.accept(proposal, self.client_state() if self.client_state else None)
        if self.wait_durable:
            durable.result()
        block = proposal.block
        self.local.remember(Base(0, block.header.model_hash, weights, proposal.weights_blob))
        log.info("genesis block %s (model %s)", block.hash[:16], block.header.model_hash[:16])
        return block, metrics

    def select(self, round: int, edges: Sequence[EdgeRef]) -> list[EdgeRef]:
        """The round's edge nodes over the whole network, as the simulator picks them: every live edge node in data
        share order, then fraction C of them with the run's seeded RNG."""
        ordered = sorted(edges, key=share_order)
        if not ordered:
            raise RoundFailed(round, [("network", "no live edge node is registered with any super node")])
        chosen = set(self.ctx.strategy.select(round, [e.node_id for e in ordered]))
        return [e for e in ordered if e.node_id in chosen]

    def plan(self, round: int, edges: Sequence[EdgeRef], roster: Roster, base: Base,
             peers: Sequence[Peer]) -> RoundPlan:
        """Under a scenario: the round's plan on the virtual clock (who is online, who trains, who is dropped and
        why, and the simulated time), from the head's clock."""
        clock = self.ctx.clock()
        assert clock is not None
        head = self.ledger.head
        if head is not None and clock.height != head.height:
            # A block this node did not plan (a resumed chain, another proposer's): the clock of the newest round
            # block (membership blocks carry none).
            for height in range(head.height, max(-1, head.height - CLOCK_LOOKBACK), -1):
                params = self.ledger.get_block(height)[0].header.params
                if SIM in params:
                    clock.resume(params)
                    break
            clock.height = head.height
        ordered = sorted(edges, key=share_order)
        if not ordered:
            raise RoundFailed(round, [("network", "no live edge node is registered with any super node")])
        validators = {node_id_for(k) for k in self.ledger.validators} - {self.local.node_id}
        others = sorted(p.node_id for p in peers if p.node_id in validators)
        holder = {edge_id: sn_id for edge_id, (sn_id, _) in roster.items()}
        return clock.plan(round, ordered, holder, self.local.node_id, others, encoded_size(base.weights),
                          self.ctx.plan().forwards)

    def all_edges(self, peers: Sequence[Peer]) -> list[EdgeRef]:
        """Every live edge node once: this super node's own, then each peer's (an unreachable peer lists none). An
        edge a peer lists beside this node's own stays this node's; one that two peers list is left out, since the
        proposer cannot tell which holds it. Who listed each, with its declared samples, is kept as this thread's
        roster, which ``_collect`` holds the partials to."""
        listed, _ = ask_all(peers, lambda peer: peer.edges(), "list edge nodes", self.concurrent)
        own = self.local.edges()
        roster: dict[str, tuple[str, int | None]] = {e.node_id: (self.local.node_id, e.samples) for e in own}
        edges = {e.node_id: e for e in own}
        contested: set[str] = set()
        for sn_id in sorted(listed):
            for edge in listed[sn_id]:
                holder = roster.get(edge.node_id, (sn_id, None))[0]
                if holder == self.local.node_id or edge.node_id in contested:
                    continue
                if holder != sn_id:
                    log.warning("edge node %s is listed by super nodes %s and %s; leaving it out of the round",
                                edge.node_id, holder, sn_id)
                    contested.add(edge.node_id)
                    del roster[edge.node_id], edges[edge.node_id]
                    continue
                roster[edge.node_id] = (sn_id, edge.samples)
                edges[edge.node_id] = edge
        self._listing.roster = roster
        return list(edges.values())

    def evaluate(self, model: Base, edges: Sequence[EdgeRef] = ()) -> dict[str, float]:
        """Global evaluation and, when the run is personalised, every given edge node's personalised accuracy."""
        metrics = self.ctx.evaluate_global(model.weights)
        if self.ctx.personalised:
            directory = self.evaluators or self.local.directory
            participants = [directory.connect(e, model) for e in sorted(edges, key=share_order)]
            try:
                personal = evaluate_personalised(participants, model.weights)
            finally:
                for p in participants:
                    directory.release(p)
            metrics.update({f"personal_accuracy_{k}": v for k, v in personal.items() if k != "count"})
        return metrics

    def run_round(self, round: int) -> RoundReport:
        """One round; failures of edge nodes and of peers are in the report. Raises RoundFailed when no update
        arrived and NoMajorityError when too few super nodes co-signed (no block then exists anywhere).

        The report's timings say where its wall time went (seconds): select_s (listing and selecting edges),
        partials_s (announce until every super node's partial arrived: the edges' training and transfers, the
        super nodes' aggregation and the partials' transfer), combine_s, evaluate_s (global and personalised
        evaluation), block_s (build and sign), cosign_s (peers verify and co-sign), store_s (the proposer's
        durable write), commit_s (peers store), round_s (all), plus the slowest super node's own figures
        (edge_train_max_s, edge_train_mean_s, transfer_max_s, sn_aggregate_s, sn_round_s).
        Rounds and membership changes run one at a time; a change that is waiting goes before the next round.
        """
        with self._changes:
            self._changes.wait_for(lambda: self._changes_waiting == 0)
        with self._serial:
            return self._run_round(round)

    def lead(self, peers: Sequence[Peer]) -> VerifiedBlock | None:
        """Make sure this node leads the view it follows (election): unless it already gathered a majority's
        promises for it, take the lead of its next view and finish the block a predecessor left prepared, if any
        (returned, final). Raises what ``take_lead`` and ``finalize`` raise."""
        view = self.state.view
        me = self.ledger.key.public_hex
        if self._led_view == view and proposer_of(view, self.ledger.validators, self.ledger.authority) == me:
            return None
        self._led_view = None
        view, recovered = take_lead(self.ledger, self.state, peers, self.local.catch_up, self.concurrent)
        self._led_view = view
        if recovered is None:
            return None
        final, refused = self._finalize(peers, recovered)
        for peer_id, why in refused:
            log.warning("recovered block %d: %s: %s", final.header.height, peer_id, why)
        log.info("view %d: block %d %s, prepared by an earlier proposer, is final", view, final.header.height,
                 final.block.hash[:12])
        return final

    def _finalize(self, peers: Sequence[Peer], proposal: VerifiedBlock,
                  timings: dict[str, float] | None = None) -> tuple[VerifiedBlock, list[tuple[str, str]]]:
        """``finalize`` in the view this node leads; a refusal or failure gives the lead up (the next block
        gathers promises again)."""
        try:
            return finalize(self.ledger, peers, proposal, view=self.state.view, state=self.state,
                            wait_durable=self.wait_durable, concurrent=self.concurrent,
                            client_state=self.client_state() if self.client_state else None, timings=timings)
        except (NetError, OSError):
            self._led_view = None
            raise

    def _run_round(self, round: int) -> RoundReport:
        started = time.perf_counter()
        peers = list(self.peers())
        recovered = self.lead(peers)
        head = self.ledger.head
        if head is None:
            raise PreconditionError("the chain has no genesis block yet")
        if recovered is not None and recovered.header.round >= round:
            return RoundReport(round, recovered.block, {}, len(recovered.records),
                               [("proposer", f"block {recovered.header.height} was prepared by an earlier proposer "
                                             "and is now final; its round's metrics are in the block")],
                               {"round_s": time.perf_counter() - started})
        if round <= head.round:
            raise PreconditionError(f"round {round} is stale: the head block closed round {head.round}")
        base = self.local.base(head.height)
        edges = self.all_edges(peers)
        roster: Roster = self._listing.roster   # who listed each edge above (all_edges, on this thread)
        plan: RoundPlan | None = None
        if self.ctx.scenario is None:
            selected = self.select(round, edges)
        else:
            plan = self.plan(round, edges, roster, base, peers)
            kept = set(plan.kept)
            selected = [e for e in sorted(edges, key=share_order) if e.node_id in kept]
            if not selected:
                clock = self.ctx.clock()
                assert clock is not None
                clock.advance(plan, max(plan.round_s, idle_s(self.ctx.scenario)))
                raise EmptyRound(round, plan.dropped or [("network", f"none of the {len(edges)} edge nodes is online "
                                                                      f"at simulated time {plan.start_s:.1f} s")])
        announcement = Announcement(round, base.height, base.model_hash, self.local.node_id,
                                    tuple(e.node_id for e in selected), self.ctx.plan(),
                                    self.state.view, self.target_round)
        timings = {"select_s": time.perf_counter() - started}
        mark = time.perf_counter()
        partials, failures = self._collect(announcement, base, peers, roster)
        timings["partials_s"] = time.perf_counter() - mark
        for p in partials:
            failures.extend(p.failures)
        accounted = {r.record.trainer_id for p in partials for r in p.records} | {node_id for node_id, _ in failures}
        failures += [(node_id, "selected, but no live super node had it to train (it left before the round)")
                     for node_id in announcement.participants if node_id not in accounted]
        if not any(p.samples > 0 for p in partials):
            raise RoundFailed(round, failures)
        timings.update(max(partials, key=lambda p: p.timings.get("sn_round_s", 0.0)).timings)
        mark = time.perf_counter()
        params: dict[str, Any] = dict(self.ctx.params())
        # Updates that arrived and were refused (by their super node, or below by this one) or left out by the
        # rule: the block lists them, so `getBlock` shows who was excluded and why.
        chosen = set(announcement.participants)
        excluded = [(node_id, why) for node_id, why in failures if why.startswith(REJECTED) and node_id in chosen]
        recorded: list[RecordedUpdate] = []
        if announcement.plan.forwards:
            try:
                outcome = aggregate_updates(partials, announcement, base, parse_rule(announcement.plan.aggregate),
                                            self.ctx.cfg.max_update_norm, announcement.plan.record_updates)
            except NothingUsable as exc:
                raise RoundFailed(round, failures + exc.excluded + [("proposer", str(exc))]) from None
            new, records = {**base.weights, **outcome.weights}, outcome.records
            excluded += outcome.excluded
            recorded = outcome.recorded
            failures += outcome.excluded
        else:
            new = {**base.weights, **combine(partials, announcement)}
            position = {node_id: i for i, node_id in enumerate(announcement.participants)}
            records = sorted((r for p in partials for r in p.records), key=lambda r: position[r.record.trainer_id])
        if excluded:
            position = {node_id: i for i, node_id in enumerate(announcement.participants)}
            excluded.sort(key=lambda item: position.get(item[0], len(position)))
            params[EXCLUDED] = [[node_id, clip_reason(why)] for node_id, why in excluded[:MAX_EXCLUDED]]
        if plan is not None:
            params[SIM] = plan.params()
        timings["combine_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        model = Base(head.height + 1, None, new)
        metrics = combine_metrics(partials, announcement)
        metrics.update(self.evaluate(model, edges))
        timings["evaluate_s"] = time.perf_counter() - mark
        mark = time.perf_counter()
        proposal = self.ledger.build(round=round, algorithm=self.ctx.strategy.name, params=params,
                                     weights=new, records=records, metrics=integer_metrics(metrics),
                                     timestamp_ms=self.ctx.timestamp(round), weights_blob=model.blob,
                                     updates=recorded)
        timings["block_s"] = time.perf_counter() - mark
        final, refused = self._finalize(peers, proposal, timings)
        failures += refused
        block = final.block
        self.local.remember(Base(block.header.height, block.header.model_hash, new, proposal.weights_blob))
        timings["round_s"] = time.perf_counter() - started
        if plan is not None:
            clock = self.ctx.clock()
            assert clock is not None
            clock.advance(plan)
            clock.height = block.header.height
            timings.update(sim_round_s=plan.round_s, sim_time_s=plan.end_s)
        log.info("round %d: block %d %s, %d updates, %d failures, %.2f s", round, block.header.height,
                 block.hash[:12], len(records), len(failures), timings["round_s"])
        return RoundReport(round, block, metrics, len(records), failures, timings, excluded,
                           plan.dropped if plan is not None else [], plan)

    def change_validators(self, op: str, key: str, node_id: str) -> MembershipResult:
        """Propose, have co-signed and store a membership block on the head that adds (``op`` "add") or removes
        ("remove") the super node ``key`` (``node_id``) from the validator set. It needs a strict majority of the
        set in force, as any block; it waits for a running round to end and never interleaves with one.

        Raises BadRequestError for a malformed change, PreconditionError for one that cannot apply (already a
        validator, not one, the last one, the authority) or an empty chain, NoMajorityError (nothing stored)
        when too few validators co-signed.
        """
        change = MembershipChange(op, key, node_id)
        try:
            change.check()
        except MembershipError as exc:
            raise BadRequestError(str(exc)) from exc
        with self._changes:
            self._changes_waiting += 1
        try:
            with self._serial:
                return self._change(change)
        finally:
            with self._changes:
                self._changes_waiting -= 1
                self._changes.notify_all()

    def _change(self, change: MembershipChange) -> MembershipResult:
        if self.ledger.head is None:
            raise PreconditionError("the chain has no genesis block yet")
        peers = list(self.peers())
        self.lead(peers)
        head = self.ledger.head
        assert head is not None
        try:
            apply_change(self.ledger.validators, change, self.ledger.authority or self.ledger.key.public_hex)
        except MembershipError as exc:
            raise PreconditionError(str(exc)) from exc
        base = self.local.base(head.height)
        proposal = self.ledger.build(round=head.round, algorithm=self.ctx.strategy.name, params=change.params(),
                                     weights=base.weights, records=[], metrics={},
                                     timestamp_ms=self.ctx.timestamp(head.round), weights_blob=base.blob)
        final, refused = self._finalize(peers, proposal)
        block = final.block
        self.local.remember(Base(block.header.height, block.header.model_hash, base.weights, base.blob))
        validators = tuple(sorted(node_id_for(k) for k in self.ledger.validators))
        for peer_id, why in refused:
            log.warning("membership block %d: %s: %s", block.header.height, peer_id, why)
        log.info("block %d %s: %s super node %s; %d validators", block.header.height, block.hash[:12],
                 "added" if change.op == "add" else "removed", change.node_id, len(validators))
        return MembershipResult(block.header.height, block.hash, validators)

    def _collect(self, announcement: Announcement, base: Base, peers: Sequence[Peer],
                 roster: Roster) -> tuple[list[Partial], list[tuple[str, str]]]:
        """Every super node's partial, this one's included, each checked against the round and the ``roster`` of
        who listed which edge. A super node that fails, or whose partial is refused, is a failure; a refused
        partial is dropped whole, and the selected edges listed under it are failures that say so."""
        everyone: list[Peer] = [self.local, *peers]
        refused: set[str] = set()

        def partial_of(peer: Peer) -> Partial:
            partial = peer.train(announcement, base)
            try:
                check_partial(partial, announcement, base, roster, peer.node_id)
            except BadRequestError:
                refused.add(peer.node_id)
                raise
            return partial

        answers, failures = ask_all(everyone, partial_of, "train", self.concurrent)
        partials = [answers[node_id] for node_id in sorted(answers)]
        shared = shared_trainers(partials)
        failures += shared
        refused |= {sn_id for sn_id, _ in shared}
        failures += [(edge_id, f"not used: the partial of its super node {roster[edge_id][0]} was refused")
                     for edge_id in announcement.participants
                     if edge_id in roster and roster[edge_id][0] in refused]
        return [p for p in partials if p.sn_id not in refused], failures
