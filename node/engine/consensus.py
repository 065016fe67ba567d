"""Proof-of-authority finality with durable votes: the proposer's block is final once a strict majority of the
validator set recorded on the chain (chain.validators) has verified it and stored it durably.

The proposer builds and signs a block, prepares it in its own journal (node.engine.election) and sends it, with
its records and model, to every peer that is a validator, which verifies it, prepares it durably and answers with
a co-signature (prepare). With co-signatures from more than half of the validators, one per key (the proposer's
own counts), the block is final: the proposer stores it in its ledger with them and tells those peers to store it
too (commit); a commit that fails is a visible failure, and that peer catches up by syncing. Without a majority,
nobody stores it and the round fails; a later proposer finds the block in the journals and finishes it. A
validator that is not among the peers (dead, never registered) simply did not co-sign; a peer that is not a
validator is not asked and catches up by syncing. Peers are in-process or remote alike (the Peer seam).
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

from chain.block import Cosignature
from chain.keys import node_id_for
from chain.validators import quorum
from chain.verify import VerifiedBlock
from node.engine.election import ConsensusState, SupersededError, highest_prepared, next_view_for
from node.engine.errors import BadRequestError, NetError, NoMajorityError, PreconditionError, UnavailableError
from node.engine.sync import store, verify
from node.engine.types import BlockData, ChainHead, Peer
from node.ledger import Ledger

log = logging.getLogger(__name__)

T = TypeVar("T")


def ask_all(peers: Sequence[Peer], call: Callable[[Peer], T], what: str, concurrent: bool = True, *,
            enough: int | None = None, raised: dict[str, NetError | OSError] | None = None,
            level: int = logging.WARNING) -> tuple[dict[str, T], list[tuple[str, str]]]:
    """``call`` on every peer, in parallel when ``concurrent`` (remote peers), else one after the other on this
    thread (in-process peers: torch then runs on one thread, which two OpenMP teams on a small machine slow down
    by about a quarter). Returns (answers by peer id, failures as (peer id, reason)); a peer that refuses or
    cannot be reached is a failure, never an exception (``raised``, when given, receives each such error; each is
    logged at ``level``).

    With ``enough``, returns as soon as that many peers answered: the others' calls go on in the background
    (each bounded by its deadline) and count neither as answers nor as failures."""
    answers: dict[str, T] = {}
    failures: list[tuple[str, str]] = []

    def settle(node_id: str, result: Callable[[], T]) -> None:
        try:
            answers[node_id] = result()
        except (NetError, OSError) as exc:
            failures.append((node_id, f"super node failed to {what}: {exc}"))
            log.log(level, "super node %s failed to %s: %s", node_id, what, exc)
            if raised is not None:
                raised[node_id] = exc

    def done() -> bool:
        return enough is not None and len(answers) >= enough

    if not concurrent:
        for peer in sorted(peers, key=lambda p: p.node_id):
            if done():
                break
            settle(peer.node_id, functools.partial(call, peer))
        return answers, sorted(failures)
    if not peers or done():
        return answers, failures
    pool = ThreadPoolExecutor(max_workers=min(len(peers), 16), thread_name_prefix=what)
    try:
        jobs = {pool.submit(call, peer): peer.node_id for peer in peers}
        for job in as_completed(jobs):
            settle(jobs[job], job.result)
            if done():
                break
    finally:
        pool.shutdown(wait=not done(), cancel_futures=True)
    return answers, sorted(failures)


def superseding_view(raised: dict[str, NetError | OSError]) -> int | None:
    """The newest view a refusing peer follows, when any refused because it follows a newer view."""
    views = [exc.view for exc in raised.values() if isinstance(exc, SupersededError)]
    return max(views) if views else None


def finalize(ledger: Ledger, peers: Sequence[Peer], proposal: VerifiedBlock, *, view: int = 0,
             state: ConsensusState | None = None, wait_durable: bool = True, concurrent: bool = True,
             client_state: dict[str, bytes] | None = None,
             timings: dict[str, float] | None = None) -> tuple[VerifiedBlock, list[tuple[str, str]]]:
    """Prepare ``proposal`` (built by ``ledger.build`` on the head, or recovered by ``take_lead``) in ``view`` with
    the peers that are validators, store it here, commit it there.

    This node prepares it first in its own journal (``state``); each validator that co-signs has verified and
    prepared it durably too. Co-signing stops as soon as a strict majority of the validator set (this node's own
    vote among it) has prepared the block: it is then final. Returns the final block and the peers' failures
    (refusals to co-sign, failed commits: data for the round report). Raises NoMajorityError, storing nothing,
    when fewer than a strict majority prepared it, naming those that did not and why; SupersededError (after
    following the newer view) when a validator follows a newer view than ``view``; UnavailableError when the
    block is final but this node could not store it (the peers were still told to commit it).
    ``timings``, when given, receives cosign_s, store_s and commit_s. Without peers and with ``wait_durable`` false
    the block is queued for writing and not waited for (the simulator flushes at the end).
    """
    timings = {} if timings is None else timings
    state = state if state is not None else ConsensusState()
    block = proposal.block
    height = block.header.height
    mark = time.perf_counter()
    data = BlockData.of(proposal)
    validators = ledger.validators
    ids = {node_id_for(key): key for key in validators}
    me = ledger.key
    asked = [peer for peer in peers if peer.node_id in ids and peer.node_id != me.node_id]
    # One vote per validator key: a super node listed under two ids answers twice with the same key and counts
    # once; a valid co-signature by a key outside the set counts for nothing.
    by_key: dict[str, Cosignature] = {}
    if me.public_hex in validators:
        state.prepare(proposal, view)   # durably, before this node's own vote counts
        by_key[me.public_hex] = Cosignature.create(height, block.hash, me)
    need = quorum(validators)
    raised: dict[str, NetError | OSError] = {}
    cosigned, failures = ask_all(asked, lambda peer: _valid(peer.cosign(data, view, me.node_id), height, block.hash),
                                 "co-sign", concurrent, enough=max(0, need - len(by_key)), raised=raised)
    newer = superseding_view(raised)
    if newer is not None:
        state.follow(newer)
        raise SupersededError.following(newer, "a newer proposer")
    for node_id, cosig in sorted(cosigned.items()):
        if cosig.signer_key not in validators:
            failures.append((node_id, "co-signed with a key that is not a validator; not counted"))
        elif cosig.signer_key in by_key:
            failures.append((node_id, "co-signed with a key that has already co-signed; counted once"))
        else:
            by_key[cosig.signer_key] = cosig
    cosigs = list(by_key.values())
    timings["cosign_s"] = time.perf_counter() - mark
    if len(cosigs) < need:
        raise NoMajorityError(_no_majority(height, len(cosigs), len(validators), need,
                                           _missing(ids, set(by_key), {p.node_id for p in asked}, failures)))
    final = proposal.cosigned(cosigs)
    mark = time.perf_counter()
    not_stored: UnavailableError | None = None
    try:
        if peers or wait_durable:
            store(ledger, final, client_state)   # final here only once durable
        else:
            ledger.accept(final, client_state)
    except UnavailableError as exc:
        not_stored = exc
    else:
        state.discard_through(height)
    timings["store_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    committers = [peer for peer in asked if peer.node_id in cosigned and ids[peer.node_id] in by_key]
    _, refused = ask_all(committers, lambda peer: peer.commit(height, block.hash, cosigs), "commit", concurrent)
    timings["commit_s"] = time.perf_counter() - mark
    if not_stored is not None:
        raise UnavailableError(f"block {height} is final ({len(cosigs)} of {len(validators)} validators prepared "
                               f"it; {len(committers) - len(refused)} peer(s) stored it) but not stored here: "
                               f"{not_stored}")
    return final, failures + refused


def take_lead(ledger: Ledger, state: ConsensusState, peers: Sequence[Peer], catch_up: Callable[[Peer], int],
              concurrent: bool = True) -> tuple[int, VerifiedBlock | None]:
    """Become the proposer of this node's next view (election): have a strict majority of the validators promise
    to follow it, catch up to the highest head among them, and return (the view, the newest-view prepared block
    at the next height, verified, when any validator holds one: it must be re-proposed before anything new).

    Raises PreconditionError when this node is no validator, NoMajorityError when too few validators promised,
    SupersededError (after following it) when one follows a newer view.
    """
    me = ledger.key
    validators = ledger.validators
    if me.public_hex not in validators:
        raise PreconditionError(f"super node {me.node_id} is not a validator, so it cannot propose blocks")
    view = next_view_for(me.public_hex, state.view, validators, ledger.authority)
    state.follow(view, me.node_id)
    ids = {node_id_for(key): key for key in validators}
    asked = [peer for peer in peers if peer.node_id in ids and peer.node_id != me.node_id]
    raised: dict[str, NetError | OSError] = {}
    promises, failures = ask_all(asked, lambda peer: peer.promise(view, me.node_id), "promise", concurrent,
                                 raised=raised)
    newer = superseding_view(raised)
    if newer is not None:
        state.follow(newer)
        raise SupersededError.following(newer, "a newer proposer")
    need = quorum(validators)
    if 1 + len(promises) < need:
        missing = _missing(ids, {me.public_hex} | {ids[node_id] for node_id in promises},
                           {p.node_id for p in asked}, failures)
        reasons = "; ".join(f"{node_id} ({why})" for node_id, why in missing)
        raise NoMajorityError(f"view {view}: {1 + len(promises)} of {len(validators)} validators promised to "
                              f"follow it (needs {need}), so no block can be final: {reasons}")
    by_id = {peer.node_id: peer for peer in asked}
    head = ledger.head
    ahead = [(p.head.height, node_id) for node_id, p in promises.items()
             if p.head is not None and (head is None or p.head.height > head.height)]
    if ahead:
        catch_up(by_id[max(ahead)[1]])
        head = ledger.head
    height = head.height + 1 if head is not None else 0
    own = state.promise(view, ChainHead(head.height, head.hash, head.model_hash) if head else None, me.node_id)
    found = highest_prepared([(me.node_id, own), *promises.items()], height)
    log.info("leading view %d: %d of %d validators follow it", view, 1 + len(promises), len(validators))
    if found is None:
        return view, None
    holder, prepared_view, block_hash = found
    held = state.prepared()
    data = held.data if holder == me.node_id and held is not None else by_id[holder].prepared_block()
    if data is None or data.block.hash != block_hash:
        raise UnavailableError(f"super node {holder} no longer holds prepared block {block_hash[:16]}; retry")
    log.info("view %d: re-proposing block %d %s prepared in view %d", view, height, block_hash[:16], prepared_view)
    return view, verify(ledger, data)


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
