"""Receiving blocks from another super node: verify once, store durably (only blocks final under this node's
validator set), and catch up with a peer's chain."""
from __future__ import annotations

import logging

from chain.verify import VerificationError, VerifiedBlock
from node.engine.errors import BadRequestError, PreconditionError, UnavailableError
from node.engine.types import BlockData, Peer
from node.ledger import Ledger, store_failure
from storage.store import NotExtendingHead, StoreError
from storage.writer import WriterFailed, describe

log = logging.getLogger(__name__)


def verify(ledger: Ledger, data: BlockData, final: bool = False) -> VerifiedBlock:
    """Verify a received block against the ledger's head, the chain's authority and its validator set, and with
    ``final`` (a block received whole, with its co-signatures) that it is final under that set
    (PreconditionError when it does not extend the head, BadRequestError when anything in it is wrong)."""
    try:
        return ledger.verify(data.block, list(data.records), data.weights_blob, list(data.cosignatures),
                             final=final, updates=list(data.updates))
    except NotExtendingHead as exc:
        raise PreconditionError(str(exc)) from exc
    except VerificationError as exc:
        raise BadRequestError(f"block refused: {exc}") from exc


def store(ledger: Ledger, verified: VerifiedBlock, client_state: dict[str, bytes] | None = None) -> None:
    """Add a verified block and wait until it is durable (PreconditionError when the head moved meanwhile,
    BadRequestError when it is not final under the validator set in force, UnavailableError when the store
    refused the write)."""
    try:
        durable = ledger.accept(verified, client_state)
    except NotExtendingHead as exc:
        raise PreconditionError(str(exc)) from exc
    except VerificationError as exc:
        raise BadRequestError(f"block refused: {exc}") from exc
    try:
        durable.result()
    except Exception as exc:
        failure = describe(exc) if isinstance(exc, (StoreError, WriterFailed)) else store_failure(exc)
        if failure is None:
            raise
        raise UnavailableError(f"block {verified.block.header.height} could not be stored here: {failure}") from exc


def sync_from(ledger: Ledger, peer: Peer) -> int:
    """Fetch, verify and store every block the peer has beyond our head, each final under the validator set in
    force before it; return how many were added.

    Raises the peer's NetError (or OSError) when it fails, BadRequestError when it sends a bad chain.
    """
    remote = peer.head()
    head = ledger.head
    start = head.height + 1 if head else 0
    if remote is None or remote.height < start:
        return 0
    added = 0
    for data in peer.blocks(start, remote.height):
        store(ledger, verify(ledger, data, final=True))
        added += 1
    log.info("synced %d block(s) from %s; head now %d", added, peer.node_id,
             ledger.head.height if ledger.head else -1)
    return added
