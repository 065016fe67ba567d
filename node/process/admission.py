"""The entry's admission of super nodes to the validator set: a super node that registers with a key that is not a
validator is added by a membership block, proposed in the background and retried with backoff until it is final."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from node.engine.coordinator import Coordinator
from node.engine.errors import NetError, PreconditionError
from node.engine.membership import Member, SuperNodeRegistry
from node.engine.types import Peer

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0   # the longest wait between two tries to admit one super node


class Admissions:
    """One background thread per registered super node that is not a validator yet, each proposing its "add" block
    until it is final, the node leaves the registry, or the entry stops. A removed validator is not re-admitted by
    registering again (``exclude``)."""

    def __init__(self, coordinator: Coordinator, registry: SuperNodeRegistry, connect: Callable[[Member], Peer],
                 stop: threading.Event, first_delay: float = 1.0):
        self.coordinator = coordinator
        self.ledger = coordinator.ledger
        self.registry = registry
        self.connect = connect            # a Peer for a registered super node (to check it is on this chain)
        self.stop = stop
        self.first_delay = first_delay
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}   # node id -> its admission thread
        self._excluded: set[str] = set()                   # keys removed from the set: not admitted again

    def poll(self) -> None:
        """Start admitting every live registered super node whose key is not a validator (once each)."""
        if self.ledger.head is None:
            return
        validators = self.ledger.validators
        for member in self.registry.members():
            with self._lock:
                if member.public_key in validators or member.public_key in self._excluded \
                        or member.node_id in self._running or self.stop.is_set():
                    continue
                thread = threading.Thread(target=self._admit, args=(member,), daemon=True,
                                          name=f"admit-{member.node_id[:8]}")
                self._running[member.node_id] = thread
            thread.start()

    def exclude(self, key: str) -> None:
        """Do not admit ``key`` again (it was removed from the validator set)."""
        with self._lock:
            self._excluded.add(key)

    def join(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)

    def _admit(self, member: Member) -> None:
        delay, attempt = self.first_delay, 0
        try:
            while not self.stop.is_set():
                attempt += 1
                if member.public_key in self.ledger.validators:
                    return
                if member.node_id not in {m.node_id for m in self.registry.members()}:
                    log.warning("super node %s left before it was admitted as a validator", member.node_id)
                    return
                try:
                    self._check_on_chain(member)
                    result = self.coordinator.change_validators("add", member.public_key, member.node_id)
                except NetError as exc:
                    log.warning("admitting super node %s as a validator (try %d): %s; retrying in %.1f s",
                                member.node_id, attempt, exc, delay)
                else:
                    log.info("super node %s admitted as a validator in block %d; %d validators", member.node_id,
                             result.height, len(result.validators))
                    return
                self.stop.wait(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        finally:
            with self._lock:
                self._running.pop(member.node_id, None)

    def _check_on_chain(self, member: Member) -> None:
        """PreconditionError unless the super node answers and its head is a block of this chain: a validator
        that cannot be reached, or follows another chain, would only ever withhold its co-signature."""
        theirs = self.connect(member).head()
        if theirs is None:
            raise PreconditionError(f"super node {member.node_id} has not synced the chain yet")
        ours = self.ledger.head
        if ours is None or theirs.height > ours.height \
                or self.ledger.get_block(theirs.height)[0].hash != theirs.hash:
            raise PreconditionError(f"super node {member.node_id} follows another chain (its block {theirs.height} "
                                    f"is {theirs.hash[:16]}...)")
