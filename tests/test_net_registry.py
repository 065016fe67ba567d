"""Membership, liveness, assignment and round order, with a hand-driven clock (no sleeping)."""
from __future__ import annotations

import pytest

from chain.keys import NodeKey
from node.engine.errors import BadRequestError, UnavailableError, NoCapacityError, PreconditionError, TakenIdError, NotFoundError
from node.engine.membership import Membership, RoundTracker, SuperNodeRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> NodeKey:
    return NodeKey.from_seed(f"node-{i}".encode())


def reg(table: Membership, i: int, capacity: int = 0):
    k = key(i)
    return table.register(k.node_id, k.public_hex, f"127.0.0.1:{5000 + i}", capacity=capacity)


def test_register_then_list() -> None:
    table = Membership(clock=Clock())

    reg(table, 1)
    reg(table, 2)

    assert [m.node_id for m in table.members()] == sorted([key(1).node_id, key(2).node_id])


def test_reregister_same_key_refreshes() -> None:
    table = Membership(clock=Clock())
    reg(table, 1)

    member = table.register(key(1).node_id, key(1).public_hex, "127.0.0.1:9999")

    assert member.address == "127.0.0.1:9999" and len(table) == 1


def test_taken_id_with_other_key_is_already_exists() -> None:
    table = Membership(clock=Clock())
    reg(table, 1)

    with pytest.raises(TakenIdError, match="another public key"):
        table.register(key(1).node_id, key(2).public_hex, "127.0.0.1:1")


def test_id_not_matching_key_is_bad_request() -> None:
    table = Membership(clock=Clock())

    with pytest.raises(BadRequestError, match="does not match"):
        table.register(key(1).node_id, key(2).public_hex, "127.0.0.1:1")


def test_bad_address_is_bad_request() -> None:
    with pytest.raises(BadRequestError, match="host:port"):
        Membership(clock=Clock()).register(key(1).node_id, key(1).public_hex, "nowhere")


def test_unknown_heartbeat_is_not_found() -> None:
    with pytest.raises(NotFoundError, match="register again"):
        Membership(clock=Clock()).heartbeat(key(1).node_id)


def test_silent_member_is_dropped_after_missed_beats() -> None:
    clock = Clock()
    table = Membership(heartbeat_interval=2.0, missed_beats=3, clock=clock)
    reg(table, 1)
    reg(table, 2)

    clock.now += 5.0
    table.heartbeat(key(2).node_id)
    clock.now += 1.5   # member 1 silent 6.5 s > 3 * 2 s; member 2 silent 1.5 s

    assert [m.node_id for m in table.members()] == [key(2).node_id]
    with pytest.raises(NotFoundError):
        table.heartbeat(key(1).node_id)


def test_member_silent_exactly_the_timeout_is_kept() -> None:
    clock = Clock()
    table = Membership(heartbeat_interval=2.0, missed_beats=3, clock=clock)
    reg(table, 1)

    clock.now += 6.0

    assert len(table) == 1


def test_full_table_is_resource_exhausted() -> None:
    table = Membership(capacity=1, clock=Clock())
    reg(table, 1)

    with pytest.raises(NoCapacityError, match="full"):
        reg(table, 2)


def test_assign_picks_fewest_edges_and_spreads() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1)
    reg(sns, 2)
    sns.heartbeat(key(1).node_id, load=3)

    picks = [sns.assign(key(10 + i).node_id, key(10 + i).public_hex).node_id for i in range(4)]

    assert picks[:3] == [key(2).node_id] * 3
    assert picks[3] == min(key(1).node_id, key(2).node_id)


def test_a_burst_of_assignments_spreads_even_when_heartbeats_report_the_old_load() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1)
    reg(sns, 2)
    picks = []
    for i in range(4):
        picks.append(sns.assign(key(10 + i).node_id, key(10 + i).public_hex).node_id)
        for n in (1, 2):    # each SN heartbeats before the edge it was given has registered with it
            sns.heartbeat(key(n).node_id, load=0)

    assert sorted(picks) == sorted([key(1).node_id, key(2).node_id] * 2)


def test_assign_is_sticky_per_edge() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1)
    reg(sns, 2)
    first = sns.assign(key(10).node_id, key(10).public_hex)

    again = sns.assign(key(10).node_id, key(10).public_hex)

    assert again.node_id == first.node_id and again.load == 1


def test_assign_skips_full_super_node_and_refuses_when_all_full() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1, capacity=1)

    sns.assign(key(10).node_id, key(10).public_hex)

    with pytest.raises(NoCapacityError, match="full"):
        sns.assign(key(11).node_id, key(11).public_hex)


def test_assign_without_live_super_node_is_unavailable() -> None:
    clock = Clock()
    sns = SuperNodeRegistry(heartbeat_interval=1.0, missed_beats=2, clock=clock)
    reg(sns, 1)
    clock.now += 3.0

    with pytest.raises(UnavailableError, match="no live super node"):
        sns.assign(key(10).node_id, key(10).public_hex)


def test_assign_moves_edge_off_a_dropped_super_node() -> None:
    clock = Clock()
    sns = SuperNodeRegistry(heartbeat_interval=1.0, missed_beats=2, clock=clock)
    reg(sns, 1)
    sns.assign(key(10).node_id, key(10).public_hex)
    reg(sns, 2)
    clock.now += 1.5
    sns.heartbeat(key(2).node_id)
    clock.now += 1.0

    moved = sns.assign(key(10).node_id, key(10).public_hex)

    assert moved.node_id == key(2).node_id
    with pytest.raises(UnavailableError):
        sns.require(key(1).node_id)


def test_stale_round_is_failed_precondition() -> None:
    rounds = RoundTracker()
    rounds.begin(1)
    rounds.begin(2)

    with pytest.raises(PreconditionError, match="stale"):
        rounds.begin(2)
    with pytest.raises(PreconditionError, match="not the current"):
        rounds.check_current(1)
