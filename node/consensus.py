"""Proof-of-authority finality: the proposer's block is final once a strict majority of live SNs co-signed it.

The proposer builds and signs a block without storing it, sends it with its records and model to every peer SN,
which verifies it fully and answers with a co-signature. With a majority (the proposer's own signature counts)
the proposer stores the block with the co-signatures and tells every peer to store it; without one, nobody
stores it and the round fails.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from chain.block import Cosignature, SignedBlock, SignedRecord
from chain.keys import NodeKey
from node import serde, sync, transport
from node.errors import BadRequestError, NoMajorityError
from node.ledger import Ledger
from node.options import DEADLINES
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import CommitRequest as CommitRequestMsg

log = logging.getLogger(__name__)


def _ask_cosign(peer: str, block: SignedBlock, records: list[SignedRecord], blob: bytes) -> Cosignature | None:
    header = block.header
    try:
        with transport.open_channel(peer) as channel:
            reply = fledger_pb2_grpc.SuperNodeStub(channel).ProposeBlock(
                sync.block_parts(block, records, blob, header.model_hash), timeout=DEADLINES.block)
        cosig = serde.cosig_from_msg(reply)
    except grpc.RpcError as exc:
        log.warning("peer %s refused block %d: %s", peer, header.height, transport.rpc_error_text(exc))
        return None
    except BadRequestError as exc:
        log.warning("peer %s answered block %d with a malformed co-signature: %s", peer, header.height, exc)
        return None
    if not cosig.valid_for(header.height, block.hash):
        log.warning("peer %s returned an invalid co-signature for block %d", peer, header.height)
        return None
    return cosig


def collect_cosignatures(key: NodeKey, peers: list[str], block: SignedBlock, records: list[SignedRecord],
                         blob: bytes) -> list[Cosignature]:
    """The proposer's co-signature plus every valid one the peers return (asked in parallel); NoMajorityError
    without a strict majority. Peers that refuse (a bad block, a dead node) are logged and count as not signing."""
    header = block.header
    cosigs = [Cosignature.create(header.height, block.hash, key)]
    if peers:
        with ThreadPoolExecutor(max_workers=min(len(peers), 16), thread_name_prefix="cosign") as pool:
            answers = list(pool.map(lambda peer: _ask_cosign(peer, block, records, blob), peers))
        cosigs += [c for c in answers if c is not None]
    total = len(peers) + 1
    if len(cosigs) * 2 <= total:
        raise NoMajorityError(f"block {header.height} got {len(cosigs)} of {total} co-signatures; no majority, "
                              "so it was not stored")
    return cosigs


def _commit(peer: str, request: CommitRequestMsg) -> None:
    try:
        with transport.open_channel(peer) as channel:
            fledger_pb2_grpc.SuperNodeStub(channel).CommitBlock(request, timeout=DEADLINES.block)
    except grpc.RpcError as exc:
        log.warning("peer %s did not commit block %d: %s", peer, request.height, transport.rpc_error_text(exc))


def commit_to_peers(peers: list[str], block: SignedBlock, cosigs: list[Cosignature]) -> None:
    """Tell every peer (in parallel) the block is final; each answers once it stored the block durably. One that
    fails catches up by syncing from the entry before its next round."""
    request = CommitRequestMsg(height=block.header.height, hash=block.hash,
                               cosignatures=[serde.cosig_to_msg(c) for c in cosigs])
    if peers:
        with ThreadPoolExecutor(max_workers=min(len(peers), 16), thread_name_prefix="commit") as pool:
            list(pool.map(lambda peer: _commit(peer, request), peers))


def propose_and_commit(ledger: Ledger, peers: list[str], block: SignedBlock, records: list[SignedRecord],
                       blob: bytes, timings: dict[str, float] | None = None) -> list[Cosignature]:
    """Finalise a block built by ``ledger.build``: co-sign with the peers, store it durably here, commit there.

    Raises NoMajorityError (and stores nothing anywhere) when too few super nodes co-signed. ``timings``, when
    given, receives cosign_s, store_s and commit_s.
    """
    timings = {} if timings is None else timings
    mark = time.perf_counter()
    cosigs = collect_cosignatures(ledger.key, peers, block, records, blob)
    timings["cosign_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    ledger.accept(block, records, blob, cosigs).result()   # final here only once durable
    timings["store_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    commit_to_peers(peers, block, cosigs)
    timings["commit_s"] = time.perf_counter() - mark
    return cosigs
