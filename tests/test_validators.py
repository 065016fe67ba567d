"""The validator set on the chain: finality by a strict majority of the recorded set (chain.validators and
chain.verify on real ledgers, SQLite and MariaDB), the proposer asking only validators (the in-process engine),
and admission, removal and a dead majority on super nodes over loopback gRPC."""
from __future__ import annotations

import dataclasses
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text
from test_engine import ScriptedEdges, Unreachable, coordinator, core, genesis

from chain.block import Cosignature, SignedBlock, build_header
from chain.keys import NodeKey
from chain.tensors import encode_weights, model_hash
from chain.validators import (
    MembershipChange,
    MembershipError,
    initial_validators,
    is_membership,
    membership_change,
    validators_after,
)
from chain.verify import Head, VerificationError, VerifiedBlock, check_final, verify_block, verify_chain
from conftest import raw_connection, wait_until
from fl.participant import Participant
from network import Network
from node.console.parse import parse_command
from node.console.repl import Console
from node.engine.errors import NetError, NoMajorityError, PreconditionError
from node.engine.supernode import SuperNodeCore
from node.engine.types import BlockData, EdgeRef
from node.ledger import Ledger, default_db_url
from storage.store import LedgerStore

A, B, C, X = (NodeKey.from_seed(f"validator-{name}".encode()) for name in "abcx")   # X is never a validator
WEIGHTS = {"w": np.arange(4, dtype=np.float32)}


# ---------------------------------------------------------------- building blocks on a real ledger

def open_ledger(url: str, tmp_path: Path, key: NodeKey = A) -> Ledger:
    return Ledger.open(tmp_path / "node", url, key=key)


def cosigned(block: VerifiedBlock, *keys: NodeKey) -> VerifiedBlock:
    return block.cosigned([Cosignature.create(block.header.height, block.block.hash, k) for k in keys])


def start(ledger: Ledger, *validators: NodeKey) -> VerifiedBlock:
    """Genesis by the ledger's key; ``validators`` (with it) are the initial set, else it alone."""
    params = {"validators": sorted({ledger.key.public_hex, *(k.public_hex for k in validators)})} if validators \
        else {}
    block = ledger.build(round=0, algorithm="fedavg", params=params, weights=WEIGHTS, records=[], metrics={},
                         timestamp_ms=0)
    ledger.accept(block).result()
    return block


def round_block(ledger: Ledger, shift: float = 1.0) -> VerifiedBlock:
    head = ledger.head
    assert head is not None
    return ledger.build(round=head.round + 1, algorithm="fedavg", params={}, weights={"w": WEIGHTS["w"] + shift},
                        records=[], metrics={}, timestamp_ms=head.round + 1)


def membership(ledger: Ledger, op: str, key: NodeKey) -> VerifiedBlock:
    head = ledger.head
    assert head is not None
    return ledger.build(round=head.round, algorithm="fedavg",
                        params=MembershipChange(op, key.public_hex, key.node_id).params(),
                        weights=ledger.load_weights(), records=[], metrics={}, timestamp_ms=head.round)


# ---------------------------------------------------------------- chain rules

def test_a_block_is_final_only_with_a_strict_majority_of_the_set_genesis_records(backend, tmp_path) -> None:
    ledger = open_ledger(backend, tmp_path)
    try:
        start(ledger, B, C)
        block = round_block(ledger)

        with pytest.raises(VerificationError, match="1 of 3 validators co-signed; a final block needs 2") as caught:
            ledger.accept(cosigned(block, A))
        assert (caught.value.height, caught.value.check, ledger.head and ledger.head.height) == (1, "quorum", 0)
        ledger.accept(cosigned(block, A, C)).result()

        assert ledger.head == block.head and ledger.validators == {A.public_hex, B.public_hex, C.public_hex}
    finally:
        ledger.close()


def test_a_key_counts_once_and_a_co_signature_by_a_non_validator_is_refused(tmp_path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.db", tmp_path)
    try:
        start(ledger, B, C)
        block = round_block(ledger)
        by = {k.public_hex: Cosignature.create(1, block.block.hash, k) for k in (A, B, X)}
        validators = ledger.validators

        with pytest.raises(VerificationError, match="co-signed twice"):
            check_final(1, [by[A.public_hex], by[A.public_hex]], validators)
        with pytest.raises(VerificationError, match="not a validator"):   # even with a majority beside it
            check_final(1, [by[A.public_hex], by[B.public_hex], by[X.public_hex]], validators)
        with pytest.raises(VerificationError, match="not a validator"):
            ledger.accept(cosigned(block, A, B, X))
        assert ledger.head is not None and ledger.head.height == 0
    finally:
        ledger.close()


def test_membership_blocks_change_the_set_and_a_reopened_ledger_and_verify_chain_agree(backend, tmp_path) -> None:
    ledger = open_ledger(backend, tmp_path)
    try:
        start(ledger)
        ledger.accept(cosigned(membership(ledger, "add", B), A)).result()      # 1 of {A}
        two = round_block(ledger)
        with pytest.raises(VerificationError, match="1 of 2"):                 # A alone is no majority of {A, B}
            ledger.accept(cosigned(two, A))
        ledger.accept(cosigned(two, A, B)).result()
        ledger.accept(cosigned(membership(ledger, "add", C), A, B)).result()
        ledger.accept(cosigned(membership(ledger, "remove", B), A, C)).result()   # 2 of {A, B, C}
        after = ledger.validators
        ledger.flush()
    finally:
        ledger.close()
    reopened = open_ledger(backend, tmp_path)
    try:
        report = reopened.verify_chain()
        header = reopened.get_block(4)[0].header
        assert after == reopened.validators == {A.public_hex, C.public_hex}
        assert report.validators == tuple(sorted(after)) and report.blocks == 5
        assert is_membership(header) and header.round == 1 and header.participants == 0
        assert membership_change(header) == MembershipChange("remove", B.public_hex, B.node_id)
    finally:
        reopened.close()


@pytest.mark.parametrize("validators, change, problem", [
    ({A, B}, ("add", B), "already a validator"),
    ({A, B}, ("remove", C), "not a validator"),
    ({A}, ("remove", A), "last validator"),
    ({A, B}, ("remove", A), "authority"),
])
def test_a_membership_change_that_cannot_apply_is_refused_clearly(tmp_path, validators, change, problem) -> None:
    op, key = change
    header = dataclasses.replace(_membership_header(), params=MembershipChange(op, key.public_hex,
                                                                                key.node_id).params())

    with pytest.raises(MembershipError, match=problem):
        validators_after({k.public_hex for k in validators}, header)


@pytest.mark.parametrize("params, problem", [
    ({"membership": {"op": "add", "key": B.public_hex, "node_id": B.node_id}, "lr": "0.1"}, "only 'membership'"),
    ({"membership": {"op": "promote", "key": B.public_hex, "node_id": B.node_id}}, "op must be one of"),
    ({"membership": {"op": "add", "key": B.public_hex, "node_id": C.node_id}}, "does not match its key"),
    ({"membership": {"op": "add", "key": "ab" * 10, "node_id": B.node_id}}, "hex public key"),
    ({"membership": {"op": "add", "key": B.public_hex}}, "exactly op, key and node_id"),
])
def test_malformed_membership_params_are_refused(params, problem) -> None:
    header = dataclasses.replace(_membership_header(), params=params)

    with pytest.raises(MembershipError, match=problem):
        validators_after({A.public_hex}, header)


@pytest.mark.parametrize("listed, problem", [
    ([B.public_hex], "include its proposer"),
    (sorted([A.public_hex, B.public_hex], reverse=True), "sorted"),
    ([], "non-empty list"),
])
def test_a_genesis_validator_list_must_be_sorted_and_name_its_proposer(listed, problem) -> None:
    genesis_header = dataclasses.replace(_membership_header(), height=0, params={"validators": listed})

    with pytest.raises(MembershipError, match=problem):
        initial_validators(genesis_header)


def _membership_header():  # noqa: ANN202
    """A well-formed membership header (A proposes, B joins) on a genesis of WEIGHTS."""
    digest = model_hash(WEIGHTS)
    prev = Head(0, "0" * 64, digest, 0)
    return build_header(prev=prev, prev_hash=prev.hash, timestamp_ms=0, round=0, algorithm="fedavg",
                        params=MembershipChange("add", B.public_hex, B.node_id).params(), model_hash=digest,
                        records=[], metrics={}, proposer=A)


def test_a_membership_block_that_changes_the_model_or_the_round_is_refused(tmp_path) -> None:
    ledger = open_ledger(f"sqlite:///{tmp_path}/l.db", tmp_path)
    try:
        first = start(ledger)
        prev = first.head
        params = MembershipChange("add", B.public_hex, B.node_id).params()
        changed = {"w": WEIGHTS["w"] + 1}
        cases = [(build_header(prev=prev, prev_hash=prev.hash, timestamp_ms=0, round=0, algorithm="fedavg",
                               params=params, model_hash=model_hash(changed), records=[], metrics={}, proposer=A),
                  changed, "must not change the model"),
                 (build_header(prev=prev, prev_hash=prev.hash, timestamp_ms=0, round=1, algorithm="fedavg",
                               params=params, model_hash=prev.model_hash, records=[], metrics={}, proposer=A),
                  WEIGHTS, "keeps the round")]
        for header, weights, problem in cases:
            block = SignedBlock.create(header, A)
            cosig = Cosignature.create(1, block.hash, A)
            with pytest.raises(VerificationError, match=problem) as caught:
                verify_block(block, [], encode_weights(weights), [cosig], prev=prev,
                             validators=ledger.validators)
            assert caught.value.check == "membership"
            with pytest.raises(VerificationError, match=problem):   # a peer refuses it before co-signing
                ledger.verify(block, [], encode_weights(weights))
    finally:
        ledger.close()


def test_verify_chain_finds_a_block_without_a_majority_of_its_validators(backend, tmp_path) -> None:
    ledger = open_ledger(backend, tmp_path)
    try:
        start(ledger, B, C)
        ledger.accept(cosigned(round_block(ledger), A, B)).result()
        two = cosigned(round_block(ledger, 2.0), A, B, C)
        ledger.accept(two).result()
        ledger.flush()
    finally:
        ledger.close()
    intruder = Cosignature.create(2, two.block.hash, X)   # a valid signature, by a key outside the set
    with raw_connection(backend) as conn:
        conn.execute(text("DELETE FROM cosignatures WHERE height = 1 AND signer_key = :k"), {"k": B.public_hex})
        conn.execute(text("INSERT INTO cosignatures (height, signer_key, signature) VALUES (2, :k, :s)"),
                     {"k": X.public_hex, "s": intruder.signature})
    store = LedgerStore(backend)
    try:
        with pytest.raises(VerificationError) as caught:
            verify_chain(store)
        assert (caught.value.height, caught.value.check) == (1, "quorum")
        with raw_connection(backend) as conn:   # put block 1 right: now block 2's intruder is found
            conn.execute(text("INSERT INTO cosignatures (height, signer_key, signature) VALUES (1, :k, :s)"),
                         {"k": B.public_hex, "s": Cosignature.create(1, _hash(store, 1), B).signature})
        with pytest.raises(VerificationError, match="not a validator") as caught:
            verify_chain(store)
        assert caught.value.height == 2
    finally:
        store.close()


def _hash(store: LedgerStore, height: int) -> str:
    return store.get_block(height)[0].hash


# ---------------------------------------------------------------- the proposer asks validators only

class Counting:
    """A peer that counts the co-signing requests it gets."""

    def __init__(self, inner: SuperNodeCore):
        self.inner, self.node_id, self.cosigned = inner, inner.node_id, 0

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)

    def cosign(self, data: BlockData, view: int = 0, sender: str = "") -> Cosignature:
        self.cosigned += 1
        return self.inner.cosign(data, view, sender)


def test_a_super_node_that_is_no_validator_trains_but_is_not_asked_to_co_sign(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    peer = Counting(core(tmp_path, "peer", ScriptedEdges([1]), upstream=entry))
    genesis(entry)   # the entry is the only validator

    report = coordinator(tmp_path, entry, [peer]).run_round(1)  # type: ignore[list-item]

    assert report.participants == 2 and peer.cosigned == 0
    assert [c.signer_key for c in entry.ledger.store.cosignatures(1)] == [entry.key.public_hex]
    peer.inner.catch_up()   # it follows the chain by syncing
    assert peer.inner.ledger.head == entry.ledger.head


def test_without_a_majority_of_the_validators_nothing_is_stored_and_the_message_says_who_is_missing(
        tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    peers = [core(tmp_path, f"peer{i}", ScriptedEdges([i + 1]), upstream=entry) for i in range(2)]
    genesis(entry, [p.key.public_hex for p in peers])
    for p in peers:
        p.catch_up()
    current: list[object] = [Unreachable(p.node_id) for p in peers]   # the round's peers, changed below
    coord = coordinator(tmp_path, entry, current)  # type: ignore[arg-type]

    with pytest.raises(NoMajorityError) as caught:
        coord.run_round(1)

    message = str(caught.value)   # the proposer could not even gather a majority to lead (election)
    assert message.startswith("view 3: 1 of 3 validators promised to follow it (needs 2), so no block can be final: ")
    assert all(f"{p.node_id} (super node failed to promise: {p.node_id} is unreachable)" in message for p in peers)
    assert [sn.ledger.head.height for sn in (entry, *peers) if sn.ledger.head] == [0, 0, 0]
    # A validator that is not even a peer of the round is named too.
    current[:] = []
    with pytest.raises(NoMajorityError, match=f"{peers[0].node_id} \\(unreachable: not a live super node here\\)"):
        coord.run_round(1)

    current[:] = peers   # they are back
    report = coord.run_round(1)

    # Co-signing stops at a majority: the proposer and the first peer; the other catches up by syncing.
    assert len(entry.ledger.store.cosignatures(1)) == 2 and report.failures == []
    for p in peers:
        p.catch_up()
    assert all(p.ledger.head == entry.ledger.head for p in peers)


def test_a_super_node_added_by_a_membership_block_co_signs_the_next_round(tmp_path: Path) -> None:
    entry = core(tmp_path, "entry", ScriptedEdges([0]))
    peer = core(tmp_path, "peer", ScriptedEdges([1]), upstream=entry)
    genesis(entry)
    coord = coordinator(tmp_path, entry, [peer])

    added = coord.change_validators("add", peer.key.public_hex, peer.node_id)
    report = coord.run_round(1)

    assert (added.height, set(added.validators)) == (1, {entry.node_id, peer.node_id})
    assert report.block.header.height == 2 and report.block.header.round == 1
    assert {c.signer_key for c in entry.ledger.store.cosignatures(2)} == {entry.key.public_hex, peer.key.public_hex}
    assert peer.ledger.head == entry.ledger.head and peer.ledger.validators == entry.ledger.validators
    with pytest.raises(PreconditionError, match="authority"):
        coord.change_validators("remove", entry.key.public_hex, entry.node_id)
    with pytest.raises(PreconditionError, match="already a validator"):
        coord.change_validators("add", peer.key.public_hex, peer.node_id)


def test_a_membership_change_waits_for_the_running_round_and_never_interleaves(tmp_path: Path) -> None:
    edges = ScriptedEdges([0])
    entry = core(tmp_path, "entry", edges)
    genesis(entry)
    coord = coordinator(tmp_path, entry, [])
    training, release = threading.Event(), threading.Event()
    original = edges.connect

    def slow_connect(edge: EdgeRef, base) -> Participant:  # noqa: ANN001
        training.set()
        release.wait(30)
        return original(edge, base)

    edges.connect = slow_connect  # type: ignore[method-assign]
    results: dict[str, object] = {}
    round_thread = threading.Thread(target=lambda: results.setdefault("round", coord.run_round(1)))
    round_thread.start()
    assert training.wait(30)
    change = threading.Thread(target=lambda: results.setdefault(
        "change", coord.change_validators("add", B.public_hex, B.node_id)))
    change.start()
    change.join(0.5)
    waited = change.is_alive()
    release.set()
    round_thread.join(30)
    change.join(30)

    assert waited and entry.ledger.head is not None and entry.ledger.head.height == 2
    assert entry.ledger.get_block(1)[0].header.round == 1 and is_membership(entry.ledger.get_block(2)[0].header)


# ---------------------------------------------------------------- super nodes over gRPC

@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Network]:
    """The entry alone, with 2 edge nodes; tests add super nodes."""
    network = Network(tmp_path / "net", supernodes=1, edges=2)
    yield network
    network.close()


def test_the_entry_admits_a_registering_super_node_by_a_block_and_it_then_co_signs(pair: Network) -> None:
    sn1 = pair.make_sn("sn1", entry=pair.entry.address)
    pair.sns.append(sn1)

    assert wait_until(lambda: sn1.key.public_hex in pair.entry.ledger.validators, timeout=30.0)
    header = pair.block(1).header
    assert membership_change(header) == MembershipChange("add", sn1.key.public_hex, sn1.key.node_id)
    progress = pair.train(1)
    assert wait_until(lambda: sn1.ledger.head == pair.entry.ledger.head, timeout=15.0)
    with pair.admin() as admin, pair.admin(sn1) as peer_admin:
        validators = sorted([pair.entry.key.node_id, sn1.key.node_id])
        assert list(admin.status().validators) == list(peer_admin.status().validators) == validators

    assert [p.round for p in progress] == [1] and progress[0].height == 2
    assert {c.signer_key for c in pair.entry.ledger.store.cosignatures(2)} == \
        {pair.entry.key.public_hex, sn1.key.public_hex}


@pytest.mark.parametrize("line", ['removeSN("3fa2")', "removeSN 3fa2", "removeSN  3fa2 "])
def test_remove_sn_takes_an_id_prefix_that_starts_with_a_digit(line: str) -> None:
    assert parse_command(line) == ("removeSN", ("3fa2",), {})


def test_remove_sn_takes_a_validator_out_by_a_block_and_it_is_not_admitted_again(pair: Network) -> None:
    sn1 = pair.make_sn("sn1", entry=pair.entry.address)
    pair.sns.append(sn1)
    assert wait_until(lambda: len(pair.entry.ledger.validators) == 2, timeout=30.0)
    out = io.StringIO()

    with Console(pair.entry.address, out=out) as console:
        refused = console.run_command(f'removeSN("{pair.entry.key.node_id[:6]}")')
        removed = console.run_command(f'removeSN("{sn1.key.node_id[:8]}")')   # a unique prefix, as getSN shows

    assert not refused and "cannot be removed" in out.getvalue()
    assert removed and f"removed in block 2 {pair.block(2).hash[:16]}; 1 validators: {pair.entry.key.node_id}" \
        in out.getvalue()
    assert membership_change(pair.block(2).header).op == "remove"
    assert pair.entry.ledger.validators == {pair.entry.key.public_hex}
    # It keeps running and registers again, as a super node that only syncs: no "add" block follows.
    assert wait_until(lambda: sn1.ledger.head == pair.entry.ledger.head, timeout=15.0)
    progress = pair.train(1)
    assert progress[0].height == 3 and pair.entry.ledger.validators == {pair.entry.key.public_hex}
    assert wait_until(lambda: sn1.ledger.head == pair.entry.ledger.head, timeout=15.0)


def test_with_two_of_three_validators_stopped_nothing_is_final_until_they_come_back(tmp_path: Path) -> None:
    net = Network(tmp_path / "net", supernodes=3, edges=3)
    try:
        assert net.train(1)[0].height == 3   # blocks 1 and 2 admitted sn1 and sn2
        head = net.head()
        assert all(wait_until(lambda sn=sn: sn.ledger.head == head, timeout=15.0) for sn in net.sns)
        for i in (1, 2):
            net.sns[i].stop(None)

        progress = net.train(1)
        with pytest.raises(NetError, match="1 of 3 validators promised to follow it \\(needs 2\\)"), \
                net.admin() as admin:
            admin.remove_supernode(net.sns[1].key.node_id)   # removing a dead one needs the same majority

        assert not progress[0].finished
        assert "round 2 failed: block 4 got 1 of 3 validators' co-signatures (needs 2); not final: " \
            in progress[0].message
        assert all(net.sns[i].key.node_id in progress[0].message for i in (1, 2))
        assert net.head() == head
        for i in (1, 2):
            store = LedgerStore(default_db_url(tmp_path / "net" / f"sn{i}"))
            assert store.head() == head, "a stopped validator stored nothing"
            store.close()

        for i in (1, 2):   # they come back on their data directories (and new ports)
            net.sns[i] = net.make_sn(f"sn{i}", entry=net.entry.address)
        back = {net.sns[i].address for i in (1, 2)}
        assert wait_until(lambda: back <= {m.address for m in net.entry.registry.members()}, timeout=15.0)
        progress = net.train(1)

        assert progress[0].finished and progress[0].round == 2 and progress[0].height == 4
        final = net.head()
        # co-signing stops at a majority (2 of 3); the third validator stores the block by commit or sync
        assert len(net.entry.ledger.store.cosignatures(4)) >= 2 and len(net.entry.ledger.validators) == 3
        assert all(wait_until(lambda sn=sn: sn.ledger.head == final, timeout=15.0) for sn in net.sns)
    finally:
        net.close()
