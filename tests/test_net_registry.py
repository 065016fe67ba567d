"""Membership, liveness and assignment of edge nodes to super nodes, with a hand-driven clock (no sleeping)."""
from __future__ import annotations

import pytest

from chain.keys import NodeKey
from node.engine.errors import BadRequestError, NoCapacityError, NotFoundError, TakenIdError, UnavailableError
from node.engine.membership import Membership, SuperNodeRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(i: int) -> NodeKey:
    return NodeKey.from_seed(f"node-{i}".encode())


def reg(table: Membership, i: int, capacity: int = 0, share: int | None = None):
    k = key(i)
    return table.register(k.node_id, k.public_hex, f"127.0.0.1:{5000 + i}", capacity=capacity, share=share)


def assign(sns: SuperNodeRegistry, i: int, share: int | None = None) -> str:
    return sns.assign(key(i).node_id, key(i).public_hex, share).node_id


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


def test_taken_id_with_other_key_is_refused_as_taken() -> None:
    table = Membership(clock=Clock())
    reg(table, 1)

    with pytest.raises(TakenIdError, match="another public key"):
        table.register(key(1).node_id, key(2).public_hex, "127.0.0.1:1")


def test_id_not_matching_key_is_refused_as_bad_request() -> None:
    table = Membership(clock=Clock())

    with pytest.raises(BadRequestError, match="does not match"):
        table.register(key(1).node_id, key(2).public_hex, "127.0.0.1:1")


def test_bad_address_is_refused_as_bad_request() -> None:
    with pytest.raises(BadRequestError, match="host:port"):
        Membership(clock=Clock()).register(key(1).node_id, key(1).public_hex, "nowhere")


def test_unknown_heartbeat_is_refused_as_not_found() -> None:
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


def test_new_member_of_a_full_table_is_refused_as_no_capacity() -> None:
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


def test_assign_without_live_super_node_is_refused_as_unavailable() -> None:
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
    with pytest.raises(NotFoundError):
        sns.get(key(1).node_id)


def test_register_records_the_share() -> None:
    table = Membership(clock=Clock())

    member = reg(table, 1, share=4)

    assert member.share == 4 and table.get(key(1).node_id).share == 4


def test_members_are_numbered_in_join_order_and_keep_it_when_refreshed() -> None:
    table = Membership(clock=Clock())
    for i in (3, 1, 2):
        reg(table, i)

    reg(table, 3)   # a refresh, not a new join

    assert [table.get(key(i).node_id).joined for i in (3, 1, 2)] == [1, 2, 3]


def test_a_member_dropped_and_back_joins_again_at_the_end() -> None:
    clock = Clock()
    table = Membership(heartbeat_interval=1.0, missed_beats=2, clock=clock)
    reg(table, 1)
    reg(table, 2)
    clock.now += 1.5
    table.heartbeat(key(2).node_id)
    clock.now += 1.0   # member 1 dropped

    back = reg(table, 1)

    assert back.joined > table.get(key(2).node_id).joined


def test_assign_puts_share_i_on_the_super_node_at_position_i_mod_k_in_join_order() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    for i in (3, 1, 2):   # join order differs from id order
        reg(sns, i)

    picks = [assign(sns, 10 + share, share) for share in range(6)]

    assert picks == [key(i).node_id for i in (3, 1, 2, 3, 1, 2)]


def test_assign_by_share_ignores_load() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1)
    reg(sns, 2)
    sns.heartbeat(key(1).node_id, load=5)

    assert assign(sns, 10, share=0) == key(1).node_id


def test_assign_by_share_falls_back_to_the_least_loaded_when_that_super_node_is_full() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1, capacity=1)
    reg(sns, 2)
    reg(sns, 3)
    sns.heartbeat(key(2).node_id, load=2)
    assign(sns, 10, share=0)   # fills super node 1

    assert assign(sns, 11, share=3) == key(3).node_id


def test_assign_by_share_counts_only_live_super_nodes_when_one_died() -> None:
    clock = Clock()
    sns = SuperNodeRegistry(heartbeat_interval=1.0, missed_beats=2, clock=clock)
    for i in (1, 2, 3):
        reg(sns, i)
    clock.now += 1.5
    sns.heartbeat(key(1).node_id)
    sns.heartbeat(key(3).node_id)
    clock.now += 1.0   # super node 2 dropped: the live ones, in join order, are 1 and 3

    picks = [assign(sns, 10 + share, share) for share in range(4)]

    assert picks == [key(i).node_id for i in (1, 3, 1, 3)]


def test_assign_moves_a_shared_edge_off_its_dead_super_node() -> None:
    clock = Clock()
    sns = SuperNodeRegistry(heartbeat_interval=1.0, missed_beats=2, clock=clock)
    reg(sns, 1)
    reg(sns, 2)
    assert assign(sns, 10, share=1) == key(2).node_id
    clock.now += 1.5
    sns.heartbeat(key(1).node_id)
    clock.now += 1.0   # super node 2 dropped

    assert assign(sns, 10, share=1) == key(1).node_id


def test_assign_by_share_refuses_when_every_super_node_is_full() -> None:
    sns = SuperNodeRegistry(clock=Clock())
    reg(sns, 1, capacity=1)
    reg(sns, 2, capacity=1)
    assign(sns, 10, share=0)
    assign(sns, 11, share=1)

    with pytest.raises(NoCapacityError, match="full"):
        assign(sns, 12, share=0)
