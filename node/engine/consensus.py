"""Proof-of-authority finality: the proposer's block is final once a strict majority of the live super nodes
co-signed it.

The proposer builds and signs a block without storing it and sends it, with its records and model, to every peer,
which verifies it and answers with a co-signature. With a majority (the proposer's own signature counts) the
proposer stores the block with the co-signatures and tells every peer to store it; without one, nobody stores it
and the round fails. Peers are in-process or remote alike (the Peer seam).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from chain.block import Cosignature
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
    """Co-sign ``proposal`` (built by ``ledger.build``) with the peers, store it here, commit it there.

    Returns the final block and the peers' failures (refusals to co-sign or commit: data for the round report).
    Raises NoMajorityError, storing nothing anywhere, when too few super nodes co-signed. ``timings``, when given,
    receives cosign_s, store_s and commit_s. Without peers and with ``wait_durable`` false the block is queued
    for writing and not waited for (the simulator flushes at the end).
    """
    timings = {} if timings is None else timings
    block = proposal.block
    height = block.header.height
    mark = time.perf_counter()
    data = BlockData.of(proposal)
    cosigned, failures = ask_all(peers, lambda peer: _valid(peer.cosign(data), height, block.hash), "co-sign",
                                 concurrent)
    # One vote per key: a super node listed under two ids answers twice with the same key and counts once.
    by_key = {ledger.key.public_hex: Cosignature.create(height, block.hash, ledger.key)}
    for node_id, cosig in sorted(cosigned.items()):
        if cosig.signer_key in by_key:
            failures.append((node_id, "co-signed with a key that has already co-signed; counted once"))
        else:
            by_key[cosig.signer_key] = cosig
    cosigs = list(by_key.values())
    timings["cosign_s"] = time.perf_counter() - mark
    total = len(peers) + 1
    if len(cosigs) * 2 <= total:
        raise NoMajorityError(f"block {height} got {len(cosigs)} of {total} co-signatures; no majority, "
                              "so it was not stored")
    final = proposal.cosigned(cosigs)
    mark = time.perf_counter()
    if peers or wait_durable:
        store(ledger, final, client_state)   # final here only once durable
    else:
        ledger.accept(final, client_state)
    timings["store_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    _, refused = ask_all(peers, lambda peer: peer.commit(height, block.hash, cosigs), "commit", concurrent)
    timings["commit_s"] = time.perf_counter() - mark
    return final, failures + refused


def _valid(cosig: Cosignature, height: int, block_hash: str) -> Cosignature:
    if not cosig.valid_for(height, block_hash):
        raise BadRequestError(f"returned an invalid co-signature for block {height}")
    return cosig
