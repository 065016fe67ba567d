"""An update weighs what the network knows, not what it claims: an edge node's sample count is bounded by the one
it declared at admission (at its super node and again at the proposer), and a super node's partial may carry only
records of edge nodes that were selected under it. A refused partial is that super node's failure; the honest
super nodes' updates are kept. In one process over real ledgers, and once over gRPC."""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from chain.keys import NodeKey
from chain.tensors import model_hash
from config import Config
from fl.participant import EvalRes, FitIns, FitRes, Participant
from network import Network
from node.engine.coordinator import Coordinator
from node.engine.errors import BadRequestError, UnavailableError
from node.engine.partial import shared_trainers
from node.engine.receipts import sign_update
from node.engine.supernode import SuperNodeCore
from node.engine.types import Announcement, Base, EdgeRef, Partial, RoundReport
from node.ledger import Ledger
from node.run import RunContext

WEIGHTS = {"w": np.arange(4, dtype=np.float32)}
DECLARED = 10


def edge_key(share: int) -> NodeKey:
    return NodeKey.from_seed(f"edge{share}".encode())


def edge_id(share: int) -> str:
    return edge_key(share).node_id


def signed(key: NodeKey, base: Base, weights: dict[str, np.ndarray], samples: int, round: int = 1) -> FitRes:
    """A result with its record signed by ``key``, as an edge node (honest or not) returns it."""
    res = FitRes(weights, samples, {"loss": 1.0, "accuracy": 0.5})
    return dataclasses.replace(res, receipt=sign_update(key, round, base.model_hash, model_hash(weights), res))


class Edge:
    """An edge node that adds ``delta`` to the base and reports ``samples``."""

    def __init__(self, share: int, base: Base, samples: int):
        self.share, self.base, self.samples = share, base, samples
        self.participant_id = edge_id(share)

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        return signed(edge_key(self.share), self.base, {k: v + np.float32(self.share + 1) for k, v in weights.items()},
                      self.samples, ins.round)

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return EvalRes(0.0, 1.0, 1)


class Edges:
    """A super node's edge nodes, each admitted with DECLARED samples; ``claims`` makes some report others."""

    concurrency = 1

    def __init__(self, shares: Sequence[int], claims: dict[int, int] | None = None):
        self.shares, self.claims = list(shares), claims or {}

    def edges(self) -> list[EdgeRef]:
        return [EdgeRef(edge_id(s), "", s, DECLARED) for s in self.shares]

    def connect(self, edge: EdgeRef, base: Base) -> Participant:
        assert edge.share is not None
        return Edge(edge.share, base, self.claims.get(edge.share, DECLARED))

    def release(self, participant: Participant) -> None:
        pass


class Rogue:
    """A super node anyone registered: it lists the edges it likes and answers a round with a partial of its own
    making (``answer``); it neither co-signs nor commits."""

    def __init__(self, answer: Callable[[Announcement, Base], Partial], lists: Sequence[EdgeRef] = (),
                 seed: bytes = b"rogue"):
        self.node_id = NodeKey.from_seed(seed).node_id
        self.answer, self.lists = answer, list(lists)

    def edges(self) -> list[EdgeRef]:
        return list(self.lists)

    def train(self, announcement: Announcement, base: Base) -> Partial:
        return self.answer(announcement, base)

    def __getattr__(self, name: str) -> Callable[..., Any]:   # cosign, commit, head, blocks
        def refuse(*_args: object) -> None:
            raise UnavailableError(f"{self.node_id} does not take part in consensus")
        return refuse


def partial_of(sn_id: str, base: Base, results: Sequence[FitRes], round: int = 1) -> Partial:
    """A partial carrying ``results`` (the first one's weights), summing their claims, as a rogue builds it."""
    return Partial(sn_id, round, sum(r.samples for r in results), dict(results[0].weights),
                   [r.receipt for r in results])  # type: ignore[misc]


def core(tmp_path: Path, name: str, edges: Edges, upstream: SuperNodeCore | None = None) -> SuperNodeCore:
    ledger = Ledger.open(tmp_path / name, key=NodeKey.from_seed(name.encode()))
    return SuperNodeCore(ledger, edges, upstream=lambda: upstream)


@pytest.fixture
def honest(tmp_path: Path) -> Iterator[tuple[SuperNodeCore, SuperNodeCore]]:
    """The entry (edges 0 and 2) and an honest peer (edge 1), from a genesis of WEIGHTS."""
    entry = core(tmp_path, "entry", Edges([0, 2]))
    peer = core(tmp_path, "peer", Edges([1]), upstream=entry)
    verified = entry.ledger.build(round=0, algorithm="fedavg", params={}, weights=WEIGHTS, records=[], metrics={},
                                  timestamp_ms=0)
    entry.ledger.accept(verified).result()
    yield entry, peer
    for sn in (entry, peer):
        sn.ledger.close()


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    """One run context for the module: its block params load the dataset once."""
    return RunContext(Config(data_root=str(tmp_path_factory.mktemp("ctx")), eval_global=False, reproducible=True))


Runner = Callable[[SuperNodeCore, Sequence[object]], RoundReport]


@pytest.fixture
def run_round(ctx: RunContext) -> Runner:
    """Round 1, proposed by the given entry over the given peers."""
    def run(entry: SuperNodeCore, peers: Sequence[object]) -> RoundReport:
        return Coordinator(ctx, entry, lambda: list(peers)).run_round(1)  # type: ignore[arg-type]
    return run


def trainers(entry: SuperNodeCore, report: RoundReport) -> list[str]:
    return [r.record.trainer_id for r in entry.ledger.get_block(report.block.header.height)[1]]


def honest_model() -> np.ndarray:
    """Edges 0, 1, 2 add 1, 2, 3 on equal samples: the entry's partial (0 and 2) then the peer's (1)."""
    w = WEIGHTS["w"]
    return (((w + 1 + w + 3) / 2 * 20 + (w + 2) * 10) / 30).astype(np.float32)


def reason(report: RoundReport, node_id: str) -> str:
    return " | ".join(why for who, why in report.failures if who == node_id)


# ---------------------------------------------------------------- at the edge's own super node

def test_an_edge_claiming_more_samples_than_it_declared_is_refused_and_the_round_commits(tmp_path: Path,
                                                                                        run_round: Runner) -> None:
    entry = core(tmp_path, "entry", Edges([0, 1, 2], claims={2: 50}))
    verified = entry.ledger.build(round=0, algorithm="fedavg", params={}, weights=WEIGHTS, records=[], metrics={},
                                  timestamp_ms=0)
    entry.ledger.accept(verified).result()

    report = run_round(entry, [])

    assert reason(report, edge_id(2)) == "rejected: claims 50 samples but declared 10 at admission"
    assert trainers(entry, report) == [edge_id(0), edge_id(1)]


# ---------------------------------------------------------------- at the proposer

def test_a_partial_with_a_record_of_an_unknown_trainer_is_refused_and_honest_updates_kept(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    stranger = NodeKey.generate()   # a "trainer" nobody admitted, as security.md's rogue made one
    rogue = Rogue(lambda ann, base: partial_of(rogue.node_id, base, [
        signed(stranger, base, {"w": base.weights["w"] + 50}, 10**12)]))

    report = run_round(entry, [peer, rogue])

    assert f"partial of super node {rogue.node_id} refused: record of edge {stranger.node_id}, which was not " \
           f"selected under {rogue.node_id} in round 1" in reason(report, rogue.node_id)
    assert trainers(entry, report) == [edge_id(0), edge_id(1), edge_id(2)]
    np.testing.assert_array_equal(entry.ledger.load_weights(1)["w"], honest_model())


def test_a_partial_carrying_an_honest_edge_selected_under_another_super_node_is_refused(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    # The rogue got edge 1 to train for it (Fit is open to anyone): a genuine record, but edge 1 is the peer's.
    rogue = Rogue(lambda ann, base: partial_of(rogue.node_id, base, [
        signed(edge_key(1), base, {"w": base.weights["w"] + 50}, DECLARED)]))

    report = run_round(entry, [peer, rogue])

    assert f"record of edge {edge_id(1)}, which was not selected under {rogue.node_id}" in \
           reason(report, rogue.node_id)
    assert trainers(entry, report) == [edge_id(0), edge_id(1), edge_id(2)]
    np.testing.assert_array_equal(entry.ledger.load_weights(1)["w"], honest_model())


def test_a_rogue_listing_the_entrys_own_edge_cannot_take_it(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    rogue = Rogue(lambda ann, base: partial_of(rogue.node_id, base, [
        signed(edge_key(0), base, {"w": base.weights["w"] + 50}, DECLARED)]),
        lists=[EdgeRef(edge_id(0), "127.0.0.1:1", 0, DECLARED)])

    report = run_round(entry, [peer, rogue])

    assert "which was not selected under" in reason(report, rogue.node_id)
    assert trainers(entry, report) == [edge_id(0), edge_id(1), edge_id(2)]


def test_an_edge_two_peers_both_list_is_left_out_and_the_other_updates_kept(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    rogue = Rogue(lambda ann, base: Partial(rogue.node_id, ann.round, 0, None),
                  lists=[EdgeRef(edge_id(1), "127.0.0.1:1", 1, DECLARED)])

    report = run_round(entry, [peer, rogue])

    assert trainers(entry, report) == [edge_id(0), edge_id(2)]
    assert edge_id(1) not in dict(report.failures)   # it was never selected
    assert "train" not in reason(report, rogue.node_id) and reason(report, peer.node_id) == ""


def test_a_record_claiming_more_than_its_edge_declared_is_refused_at_the_proposer(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    # A super node that does not check its own edge: it lists edge 5 (10 samples) but passes on a claim of 1000.
    lax = Rogue(lambda ann, base: partial_of(lax.node_id, base, [
        signed(edge_key(5), base, {"w": base.weights["w"] + 50}, 1000)]),
        lists=[EdgeRef(edge_id(5), "127.0.0.1:1", 5, DECLARED)], seed=b"lax")

    report = run_round(entry, [peer, lax])

    assert f"partial of super node {lax.node_id} refused: record of edge {edge_id(5)} claims 1000 samples but " \
           "declared 10 at admission" in reason(report, lax.node_id)
    assert "partial of its super node" in reason(report, edge_id(5))
    assert trainers(entry, report) == [edge_id(0), edge_id(1), edge_id(2)]
    np.testing.assert_array_equal(entry.ledger.load_weights(1)["w"], honest_model())


def test_a_sample_count_beyond_the_ledgers_range_is_refused_and_the_ledger_keeps_working(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    huge = Rogue(lambda ann, base: partial_of(huge.node_id, base, [
        signed(edge_key(5), base, {"w": base.weights["w"] + 50}, 2**63)]),
        lists=[EdgeRef(edge_id(5), "127.0.0.1:1", 5, 2**64 - 1)], seed=b"huge")

    report = run_round(entry, [peer, huge])
    entry.ledger.flush()   # raises if the block could not be written

    assert "more than a ledger holds" in reason(report, huge.node_id)
    assert trainers(entry, report) == [edge_id(0), edge_id(1), edge_id(2)]


def test_a_partial_that_names_another_super_node_is_refused(
        honest: tuple[SuperNodeCore, SuperNodeCore], run_round: Runner) -> None:
    entry, peer = honest
    liar = Rogue(lambda ann, base: Partial(peer.node_id, ann.round, 0, None), seed=b"liar")

    report = run_round(entry, [peer, liar])

    assert f"partial of super node {liar.node_id} refused: it says it comes from {peer.node_id}" in \
           reason(report, liar.node_id)
    assert trainers(entry, report) == [edge_id(0), edge_id(1), edge_id(2)]


def test_partials_sharing_a_trainer_are_both_refused() -> None:
    base = Base(0, None, WEIGHTS)
    one = signed(edge_key(1), base, WEIGHTS, DECLARED)
    other = signed(edge_key(2), base, WEIGHTS, DECLARED)
    partials = [partial_of("sn-a", base, [one]), partial_of("sn-b", base, [other, one]),
                partial_of("sn-c", base, [signed(edge_key(3), base, WEIGHTS, DECLARED)])]

    refused = shared_trainers(partials)

    assert [sn for sn, _ in refused] == ["sn-a", "sn-b"]
    assert refused[0][1] == f"partial of super node sn-a refused: edge {edge_id(1)} appears in the partial of " \
                            "super node sn-b too"


# ---------------------------------------------------------------- over gRPC

class Inflating:
    """An edge node's model that reports a thousand times the samples it trained on (and signs that)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        res = self.inner.fit(weights, ins)
        return dataclasses.replace(res, samples=res.samples * 1000)


def test_over_grpc_an_edge_claiming_more_than_it_declared_is_refused_and_the_round_commits(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    network = Network(tmp_path / "net", supernodes=1, edges=2)
    try:
        declared = network.ens[1].core.samples
        network.flaky[1].inner = Inflating(network.flaky[1].inner)
        with caplog.at_level(logging.WARNING):
            progress = network.train(1)
        records = network.entry.ledger.get_block(network.head().height)[1]
    finally:
        network.close()

    assert [(p.participants, p.failures) for p in progress] == [(1, 1)]
    assert [r.record.trainer_id for r in records] == [network.ens[0].key.node_id]
    assert f"claims {declared * 1000} samples but declared {declared} at admission" in caplog.text


def test_a_declared_sample_count_beyond_the_runs_training_set_is_refused_at_admission() -> None:
    from node.engine.membership import Membership

    table = Membership(kind="edge node")
    table.sample_limit = lambda: 4000
    key = NodeKey.from_seed(b"greedy")
    with pytest.raises(BadRequestError, match="training set holds 4000"):
        table.register(key.node_id, key.public_hex, "127.0.0.1:9", samples=2**39)
    assert len(table) == 0
    table.register(key.node_id, key.public_hex, "127.0.0.1:9", samples=1000)
    assert table.members()[0].samples == 1000
