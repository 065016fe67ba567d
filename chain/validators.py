"""The validator set recorded on the chain: the super nodes (Ed25519 public keys, hex) whose co-signatures make a
block final.

Genesis names the first set: its proposer, or its params' ``"validators"`` list (sorted, distinct, the proposer
among them). A *membership block* changes it by one key; it is a normal header whose params are exactly
``{"membership": {"op": "add" | "remove", "key": <hex>, "node_id": <id>}}``, with no records, the model unchanged
(model_hash == base_model_hash) and no metrics. Every other block leaves the set as it was.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from chain.block import BlockHeader
from chain.encoding import is_hex_digest
from chain.keys import PUBLIC_KEY_HEX_LEN, node_id_for

MEMBERSHIP = "membership"      # the params key of a membership block
VALIDATORS = "validators"      # the genesis params key of the initial set
OPS = ("add", "remove")


class MembershipError(ValueError):
    """A malformed validator list or membership block, or a change that cannot apply to the set in force."""


@dataclass(frozen=True)
class MembershipChange:
    """One change of the validator set, as a membership block's params carry it."""

    op: str         # "add" or "remove"
    key: str        # the super node's Ed25519 public key, hex
    node_id: str    # node_id_for(key)

    def params(self) -> dict[str, Any]:
        """The membership block's params."""
        return {MEMBERSHIP: {"op": self.op, "key": self.key, "node_id": self.node_id}}

    def check(self) -> MembershipChange:
        """This change, when well-formed (MembershipError naming what is wrong otherwise)."""
        if self.op not in OPS:
            raise MembershipError(f"membership op must be one of {', '.join(OPS)}, got {self.op!r}")
        _check_key(self.key, "membership key")
        if node_id_for(self.key) != self.node_id:
            raise MembershipError(f"membership node_id {self.node_id!r} does not match its key "
                                  f"(expected {node_id_for(self.key)})")
        return self


def is_membership(header: BlockHeader) -> bool:
    """Whether ``header`` is a membership block (it may still be malformed: see ``membership_change``)."""
    return header.height > 0 and MEMBERSHIP in header.params


def membership_change(header: BlockHeader) -> MembershipChange:
    """The change a membership block makes, after checking the block's shape (MembershipError otherwise)."""
    params = header.params
    if set(params) != {MEMBERSHIP}:
        raise MembershipError(f"a membership block's params hold only {MEMBERSHIP!r}, got {sorted(params)}")
    body = params[MEMBERSHIP]
    if not isinstance(body, dict) or set(body) != {"op", "key", "node_id"}:
        raise MembershipError("membership params must be an object with exactly op, key and node_id")
    if not all(isinstance(body[k], str) for k in ("op", "key", "node_id")):
        raise MembershipError("membership op, key and node_id must be strings")
    change = MembershipChange(body["op"], body["key"], body["node_id"]).check()
    if header.participants or header.total_samples or header.metrics:
        raise MembershipError("a membership block carries no records, samples or metrics")
    if header.model_hash != header.base_model_hash:
        raise MembershipError("a membership block must not change the model (model_hash != base_model_hash)")
    return change


def initial_validators(genesis: BlockHeader) -> frozenset[str]:
    """The set genesis names: its params' validator list when present, else its proposer alone."""
    listed = genesis.params.get(VALIDATORS)
    if listed is None:
        return frozenset({genesis.proposer_key})
    if not isinstance(listed, list) or not listed:
        raise MembershipError(f"genesis {VALIDATORS!r} must be a non-empty list of public keys")
    for key in listed:
        _check_key(key, f"genesis {VALIDATORS!r} entry")
    if listed != sorted(set(listed)):
        raise MembershipError(f"genesis {VALIDATORS!r} must be sorted and name each key once")
    if genesis.proposer_key not in listed:
        raise MembershipError(f"genesis {VALIDATORS!r} must include its proposer {genesis.proposer_id}")
    return frozenset(listed)


def apply_change(validators: Iterable[str], change: MembershipChange, authority: str) -> frozenset[str]:
    """The set after ``change``; MembershipError when it cannot apply (adding a member, removing a non-member, the
    last validator or the chain's ``authority``)."""
    current = frozenset(validators)
    change.check()
    if change.op == "add":
        if change.key in current:
            raise MembershipError(f"super node {change.node_id} is already a validator")
        return current | {change.key}
    if change.key not in current:
        raise MembershipError(f"super node {change.node_id} is not a validator")
    if len(current) == 1:
        raise MembershipError(f"super node {change.node_id} is the last validator; it cannot be removed")
    if change.key == authority:
        raise MembershipError(f"super node {change.node_id} proposes the blocks (the chain's authority); "
                              "it cannot be removed")
    return current - {change.key}


def validators_after(validators: Iterable[str], header: BlockHeader) -> frozenset[str]:
    """The set in force after block ``header``, given the set in force before it (ignored for genesis)."""
    if header.height == 0:
        return initial_validators(header)
    if not is_membership(header):
        return frozenset(validators)
    return apply_change(validators, membership_change(header), header.proposer_key)


def quorum(validators: Iterable[str]) -> int:
    """How many distinct validators' co-signatures make a block final: a strict majority of the set."""
    return len(frozenset(validators)) // 2 + 1


def _check_key(key: Any, what: str) -> None:
    if not is_hex_digest(key, PUBLIC_KEY_HEX_LEN):
        raise MembershipError(f"{what} must be a {PUBLIC_KEY_HEX_LEN}-digit hex public key, got {key!r}")
