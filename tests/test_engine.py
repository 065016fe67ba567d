"""The round engine in one process, with real ledgers and scripted edge nodes: the proposer's checks of a partial,
failing peers and edges as data, commit refusals, busy and behind super nodes, and the plan that travels with the
announcement. The gRPC side of the same seams is tested in test_net_*.py."""
from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from chain.block import Cosignature
from chain.keys import NodeKey
from chain.tensors import model_hash
from config import Config
from fl.participant import EvalRes, FitIns, FitRes, Participant
from node.engine.coordinator import Coordinator
from node.engine.errors import BadRequestError, NoMajorityError, NotFoundError, PreconditionError, UnavailableError
from node.engine.partial import check_partial
from node.engine.receipts import sign_update
from node.engine.supernode import SuperNodeCore
from node.engine.types import Announcement, Base, BlockData, EdgeRef, Partial, Peer, Plan
from node.ledger import Ledger
from node.run import RunContext

WEIGHTS = {"w": np.arange(4, dtype=np.float32)}
PLAN = Plan("fedavg", 0.05, 1, 32, 0.0, 0)


class Scripted:
    """An edge node that adds its delta to the base and signs the update; it remembers what it was asked."""

    def __init__(self, key: NodeKey, delta: float, base: Base, samples: int = 10, fail: bool = False):
        self.key, self.delta, self.base, self.samples, self.fail = key, delta, base, samples, fail
        self.participant_id = key.node_id
        self.asked: list[FitIns] = []

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        self.asked.append(ins)
        if self.fail:
            raise RuntimeError("edge node crashed")
        res = FitRes({k: v + np.float32(self.delta) for k, v in weights.items()}, self.samples,
                     {"loss": 1.0, "accuracy": 0.5})
        record = sign_update(self.key, ins.round, self.base.model_hash, model_hash(res.weights), res)
        return dataclasses.replace(res, receipt=record)

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return EvalRes(0.0, 1.0, 1)


class ScriptedEdges:
    """A super node's edge directory of scripted edge nodes (share = position in the list given)."""

    concurrency = 1

    def __init__(self, shares: Sequence[int], fail: Sequence[int] = ()):
        self.keys = {s: NodeKey.from_seed(f"edge{s}".encode()) for s in shares}
        self.fail = set(fail)
        self.connected: list[Scripted] = []

    def edges(self) -> list[EdgeRef]:
        return [EdgeRef(k.node_id, "", s) for s, k in self.keys.items()]

    def connect(self, edge: EdgeRef, base: Base) -> Participant:
        share = edge.share
        assert share is not None
        scripted = Scripted(self.keys[share], float(share + 1), base, fail=share in self.fail)
        self.connected.append(scripted)
        return scripted

    def release(self, participant: Participant) -> None:
        pass


class Unreachable:
    """A peer that has gone away."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    def __getattr__(self, name: str):  # noqa: ANN204
        def call(*_args: object) -> None:
            raise UnavailableError(f"{self.node_id} is unreachable")
        return call


def core(tmp_path: Path, name: str, edges: ScriptedEdges, upstream: SuperNodeCore | None = None) -> SuperNodeCore:
    ledger = Ledger.open(tmp_path / name, key=NodeKey.from_seed(name.encode()))
    return SuperNodeCore(ledger, edges, upstream=lambda: upstream)


def genesis(sn: SuperNodeCore, validators: Sequence[str] = ()) -> Base:
    """The genesis block; ``validators`` (public keys, ``sn``'s added) is the initial set, else ``sn`` alone."""
    params = {"validators": sorted({sn.key.public_hex, *validators})} if validators else {}
    verified = sn.ledger.build(round=0, algorithm="fedavg", params=params, weights=WEIGHTS, records=[], metrics={},
                               timestamp_ms=0)
    sn.ledger.accept(verified).result()
    return sn.base()


def coordinator(tmp_path: Path, entry: SuperNodeCore, peers: Sequence[Peer]) -> Coordinator:
    ctx = RunContext(Config(data_root=str(tmp_path), eval_global=False, reproducible=True))
    return Coordinator(ctx, entry, lambda: list(peers))


def announcement(base: Base, participants: Sequence[str], round: int = 1, proposer: str = "0" * 32) -> Announcement:
    """A round announced by ``proposer`` (a super node whose chain is still empty takes any: it has no validators
    yet to check it against)."""
    return Announcement(round, base.height, base.model_hash, proposer, tuple(participants), PLAN)


# ---------------------------------------------------------------- the proposer's checks of a partial

def partial_of(tmp_path: Path) -> tuple[Partial, Announcement, Base]:
    sn = core(tmp_path, "sn", ScriptedEdges([0, 1]))
    base = genesis(sn)
    ann = announcement(base, [e.node_id for e in sn.edges()], proposer=sn.node_id)
    return sn.train(ann), ann, base


@pytest.mark.parametrize("tamper, problem", [
    (lambda p, a: dataclasses.replace(p, round=2), "partial is for round 2"),
    (lambda p, a: dataclasses.replace(p, samples=p.samples + 1), "records sum to"),
    (lambda p, a: dataclasses.replace(p, records=p.records + p.records[:1], samples=p.samples + 10), "twice"),
    (lambda p, a: dataclasses.replace(p, weights=None), "weights must come exactly when samples > 0"),
    (lambda p, a: dataclasses.replace(p, weights={"w": np.zeros(5, dtype=np.float32)}), "does not match"),
    (lambda p, a: dataclasses.replace(p, weights={"w": np.zeros(4, dtype=np.float64)}), "does not match"),
])
def test_a_partial_that_does_not_add_up_is_refused(tmp_path: Path, tamper, problem: str) -> None:
    partial, ann, base = partial_of(tmp_path)
    check_partial(partial, ann, base)

    with pytest.raises(BadRequestError, match=problem):
        check_partial(tamper(partial, ann), ann, base)


def test_a_partial_with_a_record_of_an_edge_that_was_not_selected_is_refused(tmp_path: Path) -> None:
    partial, ann, base = partial_of(tmp_path)
    narrowed = dataclasses.replace(ann, participants=ann.participants[:1])

    with pytest.raises(BadRequestError, match="was not selected"):
        check_partial(partial, narrowed, base)


def test_a_partial_for_another_base_model_is_refused(tmp_path: Path) -> None:
    partial, ann, base = partial_of(tmp_path)
    other = Base(0, None, {"w": WEIGHTS["w"] + 1})

    with pytest.raises(BadRequestError, match="another base model"):
        check_partial(partial, ann, other)


# ---------------------------------------------------------------- rounds: failures are data

def test_a_peer_that_fails_is_a_failure_and_its_edges_are_reported_untrained(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0, 3]))
    peer = core(tmp_path, "peer", ScriptedEdges([1, 4]), upstream=entry)
    gone_key = NodeKey.from_seed(b"gone")
    genesis(entry, [peer.key.public_hex, gone_key.public_hex])   # 3 validators: 2 co-signatures are a majority
    gone = Unreachable(gone_key.node_id)

    class Lister:   # lists its edge (so it is selected), then fails to train and to co-sign
        node_id = gone_key.node_id

        def edges(self) -> list[EdgeRef]:
            return [EdgeRef(NodeKey.from_seed(b"edge2").node_id, "", 2)]

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(gone, name)

    report = coordinator(tmp_path, entry, [peer, Lister()]).run_round(1)  # type: ignore[list-item]

    reasons = [why.split(":")[0] for node_id, why in report.failures if node_id == gone_key.node_id]
    assert report.participants == 4
    # A validator that did not co-sign is not asked to commit: it catches up by syncing.
    assert reasons == ["super node failed to train", "super node failed to co-sign"]
    assert "no live super node had it" in dict(report.failures)[NodeKey.from_seed(b"edge2").node_id]
    assert peer.ledger.head == entry.ledger.head   # the live peer co-signed and stored the block


def test_an_edge_that_fails_is_a_failure_of_the_round_not_an_exception(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0, 1, 2], fail=[1]))
    genesis(entry)

    report = coordinator(tmp_path, entry, []).run_round(1)

    assert report.participants == 2
    assert [why for _, why in report.failures] == ["RuntimeError: edge node crashed"]


def test_the_combined_model_is_the_sample_weighted_average_in_share_order(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0, 2]))
    peer = core(tmp_path, "peer", ScriptedEdges([1]), upstream=entry)
    genesis(entry)

    report = coordinator(tmp_path, entry, [peer]).run_round(1)

    new = entry.ledger.load_weights(report.block.header.height)
    # the entry's partial averages shares 0 and 2 (+1, +3), the peer's is share 1 (+2); equal samples
    expected = ((WEIGHTS["w"] + 1 + WEIGHTS["w"] + 3) / 2 * 20 + (WEIGHTS["w"] + 2) * 10) / 30
    np.testing.assert_array_equal(new["w"], expected.astype(np.float32))
    _, records = entry.ledger.get_block(1)
    assert [r.record.trainer_id for r in records] == [NodeKey.from_seed(f"edge{s}".encode()).node_id
                                                      for s in (0, 1, 2)]


# ---------------------------------------------------------------- the plan travels with the announcement

def test_a_peer_trains_with_the_announced_plan_and_positions_not_its_own_settings(tmp_path: Path) -> None:
    edges = ScriptedEdges([5, 7])
    sn = core(tmp_path, "sn", edges)
    base = genesis(sn)
    ids = [e.node_id for e in sn.edges()]
    plan = Plan("fedavg", 0.125, 3, 8, 0.5, 42)

    sn.train(Announcement(1, 0, base.model_hash, sn.node_id, ("other", *ids), plan))

    asked = [s.asked[0] for s in edges.connected]
    strategy = plan.strategy()
    assert asked == [strategy.fit_ins(1, 1), strategy.fit_ins(1, 2)]
    assert {(i.lr, i.epochs, i.batch_size, i.momentum) for i in asked} == {(0.125, 3, 8, 0.5)}


# ---------------------------------------------------------------- a super node's refusals

def test_an_announcement_while_training_is_refused_as_busy(tmp_path: Path) -> None:
    release = threading.Event()
    edges = ScriptedEdges([0])
    sn = core(tmp_path, "sn", edges)
    base = genesis(sn)
    started = threading.Event()
    original = edges.connect

    def slow_connect(edge: EdgeRef, b: Base) -> Participant:
        started.set()
        release.wait(10)
        return original(edge, b)

    edges.connect = slow_connect  # type: ignore[method-assign]
    ann = announcement(base, [e.node_id for e in sn.edges()], proposer=sn.node_id)
    worker = threading.Thread(target=sn.train, args=(ann,))
    worker.start()
    try:
        assert started.wait(10)
        with pytest.raises(PreconditionError, match="already training"):
            sn.train(ann)
    finally:
        release.set()
        worker.join(10)


def test_a_super_node_behind_the_proposer_catches_up_before_it_trains(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    base = genesis(entry)
    behind = core(tmp_path, "behind", ScriptedEdges([1]), upstream=entry)

    partial = behind.train(announcement(base, [e.node_id for e in behind.edges()]))

    assert behind.ledger.head == entry.ledger.head and partial.samples == 10


def test_a_stale_round_is_refused(tmp_path: Path) -> None:
    sn = core(tmp_path, "sn", ScriptedEdges([0]))
    base = genesis(sn)

    with pytest.raises(PreconditionError, match="stale"):
        sn.train(announcement(base, [], round=0, proposer=sn.node_id))


def proposed(tmp_path: Path) -> tuple[SuperNodeCore, SuperNodeCore, BlockData]:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    peer = core(tmp_path, "peer", ScriptedEdges([1]), upstream=entry)
    genesis(entry)
    peer.train(announcement(entry.base(), []))   # catches up with genesis
    verified = entry.ledger.build(round=1, algorithm="fedavg", params={}, weights={"w": WEIGHTS["w"] + 1},
                                  records=[], metrics={}, timestamp_ms=1)
    return entry, peer, BlockData.of(verified)


def test_commit_of_a_block_that_was_never_proposed_is_not_found(tmp_path: Path) -> None:
    entry, peer, data = proposed(tmp_path)

    with pytest.raises(NotFoundError, match="propose it first"):
        peer.commit(1, data.block.hash, [Cosignature.create(1, data.block.hash, entry.key)])


def test_commit_naming_a_cosigner_twice_is_refused(tmp_path: Path) -> None:
    entry, peer, data = proposed(tmp_path)
    peer.cosign(data)
    own = Cosignature.create(1, data.block.hash, entry.key)

    with pytest.raises(BadRequestError, match="twice"):
        peer.commit(1, data.block.hash, [own, own])


def test_commit_after_the_head_moved_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    entry, peer, data = proposed(tmp_path)
    peer.cosign(data)
    rival = entry.ledger.build(round=1, algorithm="fedavg", params={}, weights={"w": WEIGHTS["w"] + 2}, records=[],
                               metrics={}, timestamp_ms=2)
    with pytest.raises(PreconditionError, match="already prepared here in view 0"):
        peer.cosign(BlockData.of(rival))   # one block per height and view
    peer.cosign(BlockData.of(rival), view=1)   # a newer view may replace an unfinished one
    peer.commit(1, rival.block.hash, [Cosignature.create(1, rival.block.hash, entry.key)])

    with pytest.raises((NotFoundError, PreconditionError)):
        peer.commit(1, data.block.hash, [Cosignature.create(1, data.block.hash, entry.key)])
    assert peer.ledger.head is not None and peer.ledger.head.hash == rival.block.hash


def test_a_super_node_listed_twice_counts_once_towards_the_majority(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    twin = core(tmp_path, "twin", ScriptedEdges([]), upstream=entry)
    alias_key, dead_keys = NodeKey.from_seed(b"alias"), [NodeKey.from_seed(f"dead{i}".encode()) for i in range(2)]
    genesis(entry, [k.public_hex for k in (twin.key, alias_key, *dead_keys)])   # 5 validators

    class Alias:   # the twin (its key) answering under another validator's id
        node_id = alias_key.node_id

        def __getattr__(self, name: str):  # noqa: ANN204
            return getattr(twin, name)

    dead = [Unreachable(k.node_id) for k in dead_keys]
    with pytest.raises(NoMajorityError, match="2 of 5"):
        coordinator(tmp_path, entry, [twin, Alias(), *dead]).run_round(1)  # type: ignore[list-item]
