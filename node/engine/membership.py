"""Membership with heartbeats and liveness: the entry's super-node registry and each super node's edge table.

Pure logic (no gRPC, no sleeping): the clock is injected so tests can move time by hand.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from chain.encoding import is_hex_digest
from chain.keys import NODE_ID_HEX_LEN, PUBLIC_KEY_HEX_LEN, node_id_for
from node.engine.errors import BadRequestError, NoCapacityError, NotFoundError, TakenIdError, UnavailableError, clip

log = logging.getLogger(__name__)

MAX_DEAD_LISTED = 64    # dropped members remembered for getSN(); older ones are forgotten
MAX_ADDRESS_CHARS = 255   # a DNS name is at most 253 characters; with ":port" a real address fits easily
MAX_SAMPLES = 2**40       # a sample count above this is a lie (and 2**63 overflows the ledger's BIGINT column)
# HOST:PORT, the host a DNS name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


@dataclass(frozen=True)
class Member:
    """One registered node as last heard from."""

    node_id: str          # node_id_for(public_key)
    public_key: str       # Ed25519 public key, hex
    address: str          # host:port where it serves
    capacity: int = 0     # SN: max edge nodes (0 = unlimited)
    samples: int = 0      # EN: local training samples
    load: int = 0         # SN: edge nodes it reports (or has been assigned since its last heartbeat)
    last_seen: float = 0.0
    share: int | None = None   # EN: its data-share index, when it said
    joined: int = 0            # order of (re-)registration in its table: the super nodes' positions


class Membership:
    """Nodes that registered and keep heartbeating; one silent for more than ``missed_beats`` intervals is dropped."""

    def __init__(self, heartbeat_interval: float = 5.0, missed_beats: int = 3, capacity: int = 0,
                 clock: Callable[[], float] = time.monotonic, kind: str = "node"):
        if heartbeat_interval <= 0 or missed_beats < 1:
            raise ValueError("heartbeat_interval must be > 0 and missed_beats >= 1")
        self.heartbeat_interval = heartbeat_interval
        self.missed_beats = missed_beats
        self.capacity = capacity          # max members (0 = unlimited)
        self.kind = kind                  # "super node" / "edge node", for messages
        self._clock = clock
        # The most samples a member may declare: an edge node's declared count bounds its averaging weight, so a
        # super node sets this to its run's training-set size (no share can hold more).
        self.sample_limit: Callable[[], int] = lambda: MAX_SAMPLES
        self._lock = threading.Lock()
        self._members: dict[str, Member] = {}
        self._dead: dict[str, Member] = {}   # dropped members, listed as dead until they register again
        self._joined = 0

    @property
    def timeout(self) -> float:
        return self.heartbeat_interval * self.missed_beats

    def register(self, node_id: str, public_key: str, address: str, capacity: int = 0, samples: int = 0,
                 share: int | None = None) -> Member:
        """Add or refresh a member; the same id with another key is refused, as is a new member when full."""
        limit = self.sample_limit()   # outside the lock: the first call may load the run's dataset
        with self._lock:
            self._prune_locked()
            check_node_id(node_id)
            known = self._members.get(node_id)
            if known is not None and known.public_key != public_key:
                raise TakenIdError(f"{self.kind} id {node_id} is already registered under another public key")
            _check_identity(node_id, public_key)
            check_address(address, f"{self.kind} {node_id}")
            if not 0 <= samples <= MAX_SAMPLES:
                raise BadRequestError(f"{self.kind} {node_id}: {samples} samples is out of range (0..2^40)")
            if samples > limit:
                raise BadRequestError(f"{self.kind} {node_id} declares {samples} training samples; this run's "
                                      f"training set holds {limit}")
            if known is None and self.capacity and len(self._members) >= self.capacity:
                raise NoCapacityError(f"{self.kind} table is full ({self.capacity}); try another super node")
            if known is None:
                self._joined += 1
            member = Member(node_id, public_key, address, capacity, samples, known.load if known else 0,
                            self._clock(), share, known.joined if known else self._joined)
            self._members[node_id] = member
            self._dead.pop(node_id, None)
        if known is None:
            log.info("%s %s registered at %s", self.kind, node_id, address)
        return member

    def heartbeat(self, node_id: str, load: int | None = None) -> Member:
        """Refresh a member's liveness (and load); an unknown or dropped id must register again."""
        check_node_id(node_id)
        with self._lock:
            self._prune_locked()
            member = self._members.get(node_id)
            if member is None:
                raise NotFoundError(f"{self.kind} {node_id} is not registered (or was dropped); register again")
            member = replace(member, last_seen=self._clock(), load=member.load if load is None else load)
            self._members[node_id] = member
            return member

    def get(self, node_id: str) -> Member:
        with self._lock:
            self._prune_locked()
            if node_id not in self._members:
                raise NotFoundError(f"unknown {self.kind} {clip(node_id, 64)}")
            return self._members[node_id]

    def members(self) -> list[Member]:
        """Live members in id order (dead ones are dropped first)."""
        return [member for member, _alive, _silent in self.listing()]

    def listing(self, include_dead: bool = False) -> list[tuple[Member, bool, float]]:
        """(member, alive, seconds since last heard) for the live members and, when asked, the dropped ones."""
        with self._lock:
            self._prune_locked()
            now = self._clock()
            rows = [(m, True, now - m.last_seen) for m in self._members.values()]
            if include_dead:
                rows += [(m, False, now - m.last_seen) for m in self._dead.values()]
        return sorted(rows, key=lambda row: (not row[1], row[0].node_id))

    def __len__(self) -> int:
        return len(self.members())

    def drop(self, node_id: str) -> None:
        """Drop a member now, as if it had gone silent (listed as dead); it may register again."""
        with self._lock:
            member = self._members.pop(node_id, None)
            if member is not None:
                self._dead[node_id] = member

    def _prune_locked(self) -> list[Member]:
        now = self._clock()
        dead = [m for m in self._members.values() if now - m.last_seen > self.timeout]
        for member in dead:
            del self._members[member.node_id]
            self._dead[member.node_id] = member
            while len(self._dead) > MAX_DEAD_LISTED:   # the oldest drops off the list
                del self._dead[next(iter(self._dead))]
            log.warning("%s %s dropped: silent for %.1f s", self.kind, member.node_id, now - member.last_seen)
        return dead


class SuperNodeRegistry(Membership):
    """The entry's view of the super nodes, and where each edge node should go."""

    def __init__(self, heartbeat_interval: float = 5.0, missed_beats: int = 3,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(heartbeat_interval, missed_beats, 0, clock, kind="super node")
        self._assigned: dict[str, str] = {}   # edge id -> super node id
        # When each SN was last given edge nodes: an SN's heartbeat reports the edges registered with it, which
        # may not yet include ones just assigned, so a burst of ENs would otherwise all go to the same SN.
        self._recent: dict[str, list[float]] = {}

    def assign(self, edge_id: str, edge_key: str, share: int | None = None) -> Member:
        """Where an edge node goes; sticky per edge. An edge of data share ``i`` goes to the live super node at
        position ``i mod K`` in the order they joined (the entry first), so the grouping of shares, and with it the
        network's aggregate, is the simulator's (``simulate --sn K``) whenever all K super nodes joined before the
        edge nodes. An edge without a share, or whose super node is full, goes to the live super node with the
        fewest edge nodes and room for one more (ties by id)."""
        _check_identity(edge_id, edge_key)
        with self._lock:
            self._prune_locked()
            if not self._members:
                raise UnavailableError("no live super node is registered; start a super node and retry")
            previous = self._members.get(self._assigned.get(edge_id, ""))
            if previous is not None:
                return previous
            now = self._clock()
            for sn_id, times in list(self._recent.items()):
                self._recent[sn_id] = [t for t in times if now - t <= self.timeout]
            load = {m.node_id: max(m.load, len(self._recent.get(m.node_id, ()))) for m in self._members.values()}
            open_ = [m for m in self._members.values() if not m.capacity or load[m.node_id] < m.capacity]
            if not open_:
                raise NoCapacityError(f"all {len(self._members)} live super nodes are full; start another one")
            ranked = sorted(self._members.values(), key=lambda m: m.joined)
            by_share = ranked[share % len(ranked)] if share is not None else None
            chosen = by_share if by_share in open_ else min(open_, key=lambda m: (load[m.node_id], m.node_id))
            # Count the edge now; the SN's next heartbeat sets the load it really has.
            chosen = replace(chosen, load=load[chosen.node_id] + 1)
            self._members[chosen.node_id] = chosen
            self._assigned[edge_id] = chosen.node_id
            self._recent.setdefault(chosen.node_id, []).append(now)
        log.info("edge node %s assigned to super node %s", edge_id, chosen.node_id)
        return chosen


def check_node_id(node_id: str, what: str = "node id") -> None:
    """BadRequestError unless ``node_id`` is a node id: NODE_ID_HEX_LEN lowercase hex digits."""
    if not is_hex_digest(node_id, NODE_ID_HEX_LEN):
        raise BadRequestError(f"{what} must be {NODE_ID_HEX_LEN} lowercase hex digits, got {clip(node_id, 40)!r}")


def check_address(address: str, who: str = "node") -> None:
    """BadRequestError unless ``address`` is HOST:PORT of at most MAX_ADDRESS_CHARS characters, port 1-65535."""
    match = _ADDRESS.fullmatch(address) if len(address) <= MAX_ADDRESS_CHARS else None
    if match is None or not 0 < int(match.group(1)) < 65536:
        raise BadRequestError(f"{clip(who, 80)}: address must be host:port (at most {MAX_ADDRESS_CHARS} characters, "
                              f"port 1-65535), got {clip(address, 80)!r}")


def _check_identity(node_id: str, public_key: str) -> None:
    check_node_id(node_id)
    if not is_hex_digest(public_key, PUBLIC_KEY_HEX_LEN):
        raise BadRequestError(f"public key must be {PUBLIC_KEY_HEX_LEN} lowercase hex digits")
    derived = node_id_for(public_key)
    if derived != node_id:
        raise BadRequestError(f"node id {node_id} does not match its public key (expected {derived})")
