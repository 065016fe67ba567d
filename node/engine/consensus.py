"""Proof-of-authority finality: the proposer's block is final once a strict majority of the validator set recorded
on the chain (chain.validators) co-signed it.

The proposer builds and signs a block without storing it and sends it, with its records and model, to every peer
that is a validator, which verifies it and answers with a co-signature. With co-signatures from more than half of
the validators, one per key (the proposer's own counts), the proposer stores the block with them and tells those
peers to store it; without, nobody stores it and the round fails. A validator that is not among the peers (dead,
never registered) simply did not co-sign; a peer that is not a validator is not asked and catches up by syncing.
Peers are in-process or remote alike (the Peer seam).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from chain.block import Cosignature
from chain.keys import node_id_for
from chain.validators import quorum
from chain.verify import VerifiedBlock
from node.engine.errors import BadRequestError, NetError, NoMajorityError
from node.engine.sync import store
from node.engine.types import BlockData, Peer
from node.ledger import Ledger

log = logging.getLogger(__name__)

T = TypeVar("T")


def ask_all(peers: Sequence[Peer], call: Callable[[Peer], T], what: str,
            concurrent: bool = True) -> tuple[dict[str, T], list[tuple[str, str]]]:
    """``call`` on every peer, in parallel when ``concurrent`` (remote peers), else one after the other on this
    thread (in-process peers: torch then runs on one thread, which two OpenMP teams on a small machine slow down
    by about a quarter). Returns (answers by peer id, failures as (peer id, reason)); a peer that refuses or
    cannot be reached is a failure, never an exception."""
    answers: dict[str, T] = {}
    failures: list[tuple[str, str]] = []

    def settle(node_id: str, result: Callable[[], T]) -> None:
        try:
            answers[node_id] = result()
        except (NetError, OSError) as exc:
            failures.append((node_id, f"super node failed to {what}: {exc}"))
            log.warning("super node %s failed to %s: %s", node_id, what, exc)

    if not concurrent:
        for peer in sorted(peers, key=lambda p: p.node_id):
            settle(peer.node_id, functools.partial(call, peer))
        return answers, failures
    if not peers:
        return answers, failures
    with ThreadPoolExecutor(max_workers=min(len(peers), 16), thread_name_prefix=what) as pool:
        jobs = {peer.node_id: pool.submit(call, peer) for peer in peers}
        for node_id, job in sorted(jobs.items()):
            settle(node_id, job.result)
    return answers, failures


def finalize(ledger: Ledger, peers: Sequence[Peer], proposal: VerifiedBlock, *, wait_durable: bool = True,
             concurrent: bool = True, client_state: dict[str, bytes] | None = None,
             timings: dict[str, float] | None = None) -> tuple[VerifiedBlock, list[tuple[str, str]]]:
    """Co-sign ``proposal`` (built by ``ledger.build`` on the head) with the peers that are validators, store it
    here, commit it there.

    The validator set is the ledger's, in force at its head. Returns the final block and the peers' failures
    (refusals to co-sign or commit: data for the round report). Raises NoMajorityError, storing nothing anywhere,
    when fewer than a strict majority of the validators co-signed, naming those that did not and why.
    ``timings``, when given, receives cosign_s, store_s and commit_s. Without peers and with ``wait_durable`` false
    the block is queued for writing and not waited for (the simulator flushes at the end).
    """
    timings = {} if timings is None else timings
    block = proposal.block
    height = block.header.height
    mark = time.perf_counter()
    data = BlockData.of(proposal)
    validators = ledger.validators
    ids = {node_id_for(key): key for key in validators}
    asked = [peer for peer in peers if peer.node_id in ids and peer.node_id != ledger.key.node_id]
    cosigned, failures = ask_all(asked, lambda peer: _valid(peer.cosign(data), height, block.hash), "co-sign",
                                 concurrent)
    # One vote per validator key: a super node listed under two ids answers twice with the same key and counts
    # once; a valid co-signature by a key outside the set counts for nothing.
    by_key: dict[str, Cosignature] = {}
    if ledger.key.public_hex in validators:
        by_key[ledger.key.public_hex] = Cosignature.create(height, block.hash, ledger.key)
    for node_id, cosig in sorted(cosigned.items()):
        if cosig.signer_key not in validators:
            failures.append((node_id, "co-signed with a key that is not a validator; not counted"))
        elif cosig.signer_key in by_key:
            failures.append((node_id, "co-signed with a key that has already co-signed; counted once"))
        else:
            by_key[cosig.signer_key] = cosig
    cosigs = list(by_key.values())
    timings["cosign_s"] = time.perf_counter() - mark
    need = quorum(validators)
    if len(cosigs) < need:
        raise NoMajorityError(_no_majority(height, len(cosigs), len(validators), need,
                                           _missing(ids, set(by_key), {p.node_id for p in asked}, failures)))
    final = proposal.cosigned(cosigs)
    mark = time.perf_counter()
    if peers or wait_durable:
        store(ledger, final, client_state)   # final here only once durable
    else:
        ledger.accept(final, client_state)
    timings["store_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    committers = [peer for peer in asked if ids[peer.node_id] in by_key]
    _, refused = ask_all(committers, lambda peer: peer.commit(height, block.hash, cosigs), "commit", concurrent)
    timings["commit_s"] = time.perf_counter() - mark
    return final, failures + refused


def _missing(ids: dict[str, str], signed: set[str], asked: set[str],
             failures: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """(validator id, why) for every validator whose co-signature is missing."""
    why = dict(failures)
    return [(node_id, why.get(node_id, "did not co-sign") if node_id in asked
             else "unreachable: not a live super node here")
            for node_id, key in sorted(ids.items()) if key not in signed]


def _no_majority(height: int, got: int, total: int, need: int, missing: Sequence[tuple[str, str]]) -> str:
    reasons = "; ".join(f"{node_id} ({why})" for node_id, why in missing)
    return (f"block {height} got {got} of {total} validators' co-signatures (needs {need}); not final: "
            f"{reasons or 'none missing'}")


def _valid(cosig: Cosignature, height: int, block_hash: str) -> Cosignature:
    if not cosig.valid_for(height, block_hash):
        raise BadRequestError(f"returned an invalid co-signature for block {height}")
    return cosig
