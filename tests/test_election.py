"""Who proposes and how another validator takes over (node.engine.election, node.engine.consensus.take_lead), on
real ledgers with in-process super nodes: turn order, the durable journal, the prepare rules, and the safety case:
a block that a majority prepared survives its proposer and is finished, never replaced, by the next one."""
from __future__ import annotations

from pathlib import Path

import pytest
from test_engine import WEIGHTS, ScriptedEdges, Unreachable, coordinator, core, genesis

from chain.block import Cosignature
from chain.keys import NodeKey
from node.engine.consensus import finalize, take_lead
from node.engine.election import (
    PREPARED_FILE,
    ConsensusState,
    SupersededError,
    next_view_for,
    proposer_of,
    proposer_order,
    turn_after,
)
from node.engine.errors import NoMajorityError, PreconditionError
from node.engine.supernode import SuperNodeCore
from node.engine.types import BlockData

KEYS = [NodeKey.from_seed(f"elect-{i}".encode()).public_hex for i in range(4)]


def test_turns_go_by_node_id_from_the_authority_and_each_view_has_one_proposer() -> None:
    authority = KEYS[2]
    order = proposer_order(KEYS, authority)
    assert order[0] == authority and sorted(order) == sorted(KEYS) and len(set(order)) == 4
    assert [proposer_of(v, KEYS, authority) for v in range(8)] == order + order
    for key in KEYS:
        view = next_view_for(key, 5, KEYS, authority)
        assert view > 5 and proposer_of(view, KEYS, authority) == key and view - 5 <= 4
    assert turn_after(order[1], 0, KEYS, authority) == 1 and turn_after(order[0], 0, KEYS, authority) == 0
    with pytest.raises(ValueError):
        next_view_for("ab" * 32, 0, KEYS, authority)


def block(sn: SuperNodeCore, shift: float) -> BlockData:
    head = sn.ledger.head
    assert head is not None
    verified = sn.ledger.build(round=head.round + 1, algorithm="fedavg", params={},
                               weights={"w": WEIGHTS["w"] + shift}, records=[], metrics={},
                               timestamp_ms=head.round + 1)
    return BlockData.of(verified)


def three(tmp_path: Path) -> list[SuperNodeCore]:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    peers = [core(tmp_path, f"peer{i}", ScriptedEdges([i + 1]), upstream=entry) for i in range(2)]
    genesis(entry, [p.key.public_hex for p in peers])
    for p in peers:
        p.catch_up()
    return [entry, *peers]


def test_the_journal_survives_a_restart_and_a_damaged_one_is_ignored(tmp_path: Path) -> None:
    entry, peer, _ = three(tmp_path)
    data = block(entry, 1)
    (tmp_path / "state").mkdir()
    state = ConsensusState(tmp_path / "state")
    state.prepare(peer.ledger.verify(data.block, data.records, data.weights_blob), 7)
    state.set_target(12)

    again = ConsensusState(tmp_path / "state")
    held = again.prepared()
    assert again.view == 7 and again.target_round == 12 and held is not None
    assert held.data.block.hash == data.block.hash and held.data.weights_blob == data.weights_blob
    assert held.view == 7
    (tmp_path / "state" / PREPARED_FILE).write_bytes(b"fledger-prepared-1\n\x00\x01")
    assert ConsensusState(tmp_path / "state").prepared() is None


def test_a_validator_prepares_one_block_per_height_and_view_and_refuses_older_views(tmp_path: Path) -> None:
    entry, peer, _ = three(tmp_path)
    first, rival = block(entry, 1), block(entry, 2)
    peer.cosign(first, view=3)
    with pytest.raises(PreconditionError, match="already prepared here in view 3"):
        peer.cosign(rival, view=3)
    with pytest.raises(SupersededError, match="follows view 3"):
        peer.cosign(rival, view=2)
    assert peer.cosign(rival, view=4).valid_for(1, rival.block.hash)   # a newer view may replace it
    held = peer.state.prepared()
    assert held is not None and held.hash == rival.block.hash and held.view == 4


def test_co_signing_stops_at_a_majority_and_a_failed_commit_is_a_failure(tmp_path: Path) -> None:
    entry, *peers = three(tmp_path)
    asked_first, never = sorted(peers, key=lambda p: p.node_id)   # in-process peers are asked in id order
    data = block(entry, 1)
    verified = entry.ledger.verify(data.block, data.records, data.weights_blob)

    class Failing:   # co-signs, then cannot store
        node_id = asked_first.node_id

        def cosign(self, data: BlockData, view: int = 0, sender: str = "") -> Cosignature:
            return asked_first.cosign(data, view, sender)

        def commit(self, *args: object) -> None:
            raise Unreachable(asked_first.node_id).commit()

    final, failures = finalize(entry.ledger, [Failing(), never], verified,  # type: ignore[list-item]
                               concurrent=False)

    assert len(final.cosignatures) == 2   # the entry and the first peer: a majority of 3; the other not asked
    assert never.state.prepared() is None
    assert [node_id for node_id, _ in failures] == [asked_first.node_id]
    assert "failed to commit" in failures[0][1]


def test_a_block_a_majority_prepared_survives_its_proposer_and_is_finished_by_the_next(tmp_path: Path) -> None:
    entry, one, two = three(tmp_path)
    leading = coordinator(tmp_path, entry, [one, Unreachable(two.node_id)])  # type: ignore[list-item]
    view = leading.state.view
    data = block(entry, 1)
    # The entry prepares its block, and so does `one`: a majority (2 of 3). Then the entry dies before committing.
    entry.state.prepare(entry.ledger.verify(data.block, data.records, data.weights_blob), view)
    one.cosign(data, view)

    # `two` takes over: `one` promises and reports the prepared block; `two` must finish that very block.
    led, recovered = take_lead(two.ledger, two.state, [one, Unreachable(entry.node_id)],  # type: ignore[list-item]
                               two.catch_up, concurrent=False)
    assert led > view and recovered is not None and recovered.block.hash == data.block.hash
    final, _ = finalize(two.ledger, [one], recovered, view=led, state=two.state, concurrent=False)
    assert two.ledger.head is not None and two.ledger.head.hash == data.block.hash
    assert one.ledger.head is not None and one.ledger.head.hash == data.block.hash

    # The old proposer comes back and tries a different block at the same height: in its old view its own journal
    # refuses it; in the newest view the others refuse a block that does not extend their head.
    rival = block(entry, 9)   # on its own (old) head: height 1 again
    verified_rival = entry.ledger.verify(rival.block, rival.records, rival.weights_blob)
    with pytest.raises(PreconditionError, match="already prepared here"):
        finalize(entry.ledger, [one, two], verified_rival, view=view, state=entry.state, concurrent=False)
    with pytest.raises((SupersededError, NoMajorityError)):   # an older view, or a block on a stale head
        finalize(entry.ledger, [one, two], verified_rival, view=led, state=entry.state, concurrent=False)
    assert entry.ledger.head is not None and entry.ledger.head.height == 0   # it stored nothing
    entry.catch_up(two)
    assert entry.ledger.head == two.ledger.head and final.block.hash == data.block.hash


def test_without_a_majority_of_promises_nobody_leads(tmp_path: Path) -> None:
    entry, one, two = three(tmp_path)
    dead = [Unreachable(one.node_id), Unreachable(two.node_id)]
    with pytest.raises(NoMajorityError, match="1 of 3 validators promised"):
        take_lead(entry.ledger, entry.state, dead, entry.catch_up, concurrent=False)  # type: ignore[arg-type]
    stranger = core(tmp_path, "stranger", ScriptedEdges([]), upstream=entry)
    stranger.catch_up()
    with pytest.raises(PreconditionError, match="not a validator"):
        take_lead(stranger.ledger, stranger.state, [entry], stranger.catch_up)

