"""A super node's part in rounds and consensus, independent of how it is reached: it trains its edge nodes' share
of an announced round, verifies and co-signs proposed blocks, stores committed ones, and serves its chain. It is
the in-process Peer; the gRPC service is a thin wrapper around it."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence

from chain.block import Cosignature, MalformedError
from chain.keys import node_id_for
from chain.verify import VerificationError, VerifiedBlock
from node.engine.election import ConsensusState, proposer_of
from node.engine.errors import BadRequestError, ForbiddenError, NotFoundError, PreconditionError, UnavailableError
from node.engine.partial import train_partial
from node.engine.sync import store, sync_from, verify
from node.engine.types import Announcement, Base, BlockData, ChainHead, EdgeDirectory, EdgeRef, Partial, Peer, Promise
from node.ledger import Ledger

log = logging.getLogger(__name__)


class SuperNodeCore:
    """One super node's round and block logic over its ledger and its edge nodes."""

    def __init__(self, ledger: Ledger, directory: EdgeDirectory,
                 upstream: Callable[[], Peer | None] = lambda: None, state: ConsensusState | None = None):
        self.ledger = ledger
        self.state = state if state is not None else ConsensusState()   # view and prepared block (election)
        self.last_activity = time.monotonic()   # when the proposer was last heard (a round, a block, a commit)
        self.key = ledger.key
        self.node_id = ledger.key.node_id
        self.directory = directory
        self.upstream = upstream              # the proposer to catch up from when an announcement is ahead of us
        self._round_lock = threading.Lock()
        self._sync_lock = threading.Lock()   # one catch-up at a time (a round's, a co-signing's, a heartbeat's)
        self._lock = threading.Lock()
        self._pending: dict[str, VerifiedBlock] = {}   # block hash -> verified and co-signed, not yet committed
        self._base: Base | None = None                  # the last model a round started from (or a block stored)

    # ---- rounds ---------------------------------------------------------------------------------------------

    def edges(self) -> list[EdgeRef]:
        return self.directory.edges()

    def base(self, height: int | None = None) -> Base:
        """The model at ``height`` (default: the head), decoded once and kept until the next one is asked for."""
        head = self.ledger.head
        if head is None:
            raise PreconditionError("the chain has no genesis block yet")
        height = head.height if height is None else height
        with self._lock:
            cached = self._base
        if cached is not None and cached.height == height \
                and (height != head.height or cached.model_hash == head.model_hash):
            return cached
        model_hash = head.model_hash if height == head.height else self.ledger.get_block(height)[0].header.model_hash
        base = Base(height, model_hash, self.ledger.load_weights(height))   # waits for a queued write
        with self._lock:
            self._base = base
        return base

    def remember(self, base: Base) -> None:
        """Keep a model this node already holds in memory (the proposer's new model) for the next round."""
        with self._lock:
            self._base = base

    def train(self, announcement: Announcement, base: Base | None = None) -> Partial:
        """Train this node's selected edge nodes for the announced round (``base``: the caller's copy of the base,
        used as is when it matches; a peer loads its own). Refuses a stale round or one it is already training."""
        round = announcement.round
        self.check_validator(announcement.proposer_id, "announces rounds")
        self.state.follow(announcement.view, announcement.proposer_id)
        self.check_healthy()
        self.heard()
        if announcement.target_round:
            self.state.set_target(announcement.target_round, dataclasses.asdict(announcement.plan))
        if not self._round_lock.acquire(blocking=False):
            raise PreconditionError(f"round {round} refused: this super node is already training a round")
        try:
            head = self.ledger.head
            if head is not None and round <= head.round:
                raise PreconditionError(f"round {round} is stale: this node's head closed round {head.round}")
            upstream = self.upstream()
            if (head is None or head.height < announcement.base_height) and upstream is not None:
                self.catch_up(upstream)   # behind the proposer: catch up first
                head = self.ledger.head
            if head is None or head.height != announcement.base_height \
                    or head.model_hash != announcement.base_model_hash:
                raise PreconditionError(f"round {round} starts from block {announcement.base_height} (model "
                                        f"{announcement.base_model_hash[:16]}), which is not this node's head")
            if base is None or base.height != head.height or base.model_hash != head.model_hash:
                base = self.base(head.height)
            partial = train_partial(self.node_id, announcement, base, self.directory)
            log.info("round %d: partial of %d samples from %d edge(s), %d failure(s)", round, partial.samples,
                     len(partial.records), len(partial.failures))
            return partial
        finally:
            self._round_lock.release()

    def catch_up(self, upstream: Peer | None = None) -> int:
        """Sync from ``upstream`` (default: this node's) every block it has beyond the head, each verified final
        under the validator set in force; how many were added. A node that is no validator gets no commits and
        catches up this way."""
        upstream = upstream if upstream is not None else self.upstream()
        if upstream is None:
            return 0
        with self._sync_lock:
            added = sync_from(self.ledger, upstream)
        head = self.ledger.head
        if head is not None:
            self.state.discard_through(head.height)
        return added

    # ---- blocks ---------------------------------------------------------------------------------------------

    def heard(self) -> None:
        """The proposer was heard from just now (the takeover watchdog counts from here)."""
        self.last_activity = time.monotonic()

    def check_healthy(self) -> None:
        """UnavailableError while this node's ledger cannot write: it sits out rounds and blocks, saying why."""
        if not self.ledger.healthy:
            raise UnavailableError(f"super node {self.node_id} sits out until its store works again: "
                                   f"{self.ledger.health_reason}")

    def proposer(self) -> str | None:
        """The node id of the proposer of the view this node follows."""
        key = proposer_of(self.state.view, self.ledger.validators, self.ledger.authority)
        return node_id_for(key) if key is not None else None

    def check_validator(self, node_id: str, what: str) -> None:
        """ForbiddenError unless ``node_id`` is a validator (or nobody is yet): only validators propose, so only
        they may move this node to another view."""
        validators = self.ledger.validators
        if validators and node_id not in {node_id_for(k) for k in validators}:
            raise ForbiddenError(f"super node {node_id} {what}, but it is not a validator")

    def cosign(self, data: BlockData, view: int = 0, sender: str = "") -> Cosignature:
        """Verify a proposed block once, against this node's head, the chain's authority and its validator set,
        write it to this node's journal as its prepared block of ``view`` (election), and co-sign it: a
        co-signature means "verified and durably stored". A node more than one block behind (a validator just
        admitted, or one that missed a block) first catches up from its upstream. Refuses (SupersededError) a view
        older than the one it follows, and (UnavailableError) any block while its ledger cannot write."""
        self.check_validator(sender or (data.block.header.proposer_id if _parses(data) else ""), "proposes blocks")
        self.state.follow(view, sender)
        self.check_healthy()
        self.heard()
        head, upstream = self.ledger.head, self.upstream()
        if upstream is not None and data.block.header.height > (head.height + 1 if head is not None else 0):
            self.catch_up(upstream)
        verified = verify(self.ledger, data)
        height = verified.block.header.height
        self.state.prepare(verified, view)
        with self._lock:
            self._pending = {h: b for h, b in self._pending.items() if b.block.header.height >= height}
            self._pending[verified.block.hash] = verified
        log.info("co-signing block %d (%s...) in view %d", height, verified.block.hash[:16], view)
        return Cosignature.create(height, verified.block.hash, self.key)

    def commit(self, height: int, block_hash: str, cosignatures: Sequence[Cosignature]) -> None:
        """Store a block this node prepared, once the proposer shows co-signatures of a strict majority of this
        node's validator set; returns when it is durable here. A block this node already stored is answered at
        once (a re-sent commit)."""
        self.heard()
        head = self.ledger.head
        if head is not None and head.height >= height:
            if height == head.height and head.hash == block_hash:
                return
            stored, _ = self.ledger.get_block(height)
            if stored.hash == block_hash:
                return
            raise PreconditionError(f"block {height} here is {stored.hash[:16]}, not {block_hash[:16]}")
        with self._lock:
            verified = self._pending.get(block_hash)
        if verified is None:
            held = self.state.prepared()
            if held is not None and held.hash == block_hash:
                verified = verify(self.ledger, held.data)
        if verified is None or verified.block.header.height != height:
            raise NotFoundError(f"no proposed block {block_hash} at height {height} is pending here; propose it first")
        store(self.ledger, with_cosignatures(verified, cosignatures, self.ledger.validators))
        self.state.discard_through(height)
        with self._lock:
            # Drop this block and any other proposal for the same height: only one can ever extend the chain.
            self._pending = {h: b for h, b in self._pending.items() if b.block.header.height > height}

    def promise(self, view: int, candidate: str = "") -> Promise:
        """Follow ``view`` from now on, for candidate proposer ``candidate`` (SupersededError when this node
        follows a newer one), and report the head, the prepared block and the training target."""
        head = self.ledger.head
        self.check_validator(candidate, "asks to lead")
        held = self.state.prepared()
        if held is not None and head is not None and held.height <= head.height:
            self.state.discard_through(head.height)
        self.heard()
        return self.state.promise(view, self.head(), candidate)

    def prepared_block(self) -> BlockData | None:
        """The block this node holds prepared, as it was proposed (None when none)."""
        held = self.state.prepared()
        return held.data if held is not None else None

    def model_blob(self, height: int) -> tuple[str, bytes]:
        """(model hash, encoded weights) of the block at ``height``, as stored."""
        head = self.ledger.head
        if head is None or height > head.height:
            raise NotFoundError(f"no block at height {height}")
        block, _ = self.ledger.get_block(height)
        return block.header.model_hash, self.ledger.load_weights_blob(height)

    def head(self) -> ChainHead | None:
        """The durable head: a block still being written is not reported."""
        head = self.ledger.durable_head
        return None if head is None else ChainHead(head.height, head.hash, head.model_hash)

    def blocks(self, start: int, end: int) -> Iterator[BlockData]:
        head = self.ledger.head
        if head is None or start > head.height:
            raise NotFoundError(f"no blocks from height {start}; the head is {head.height if head else 'empty'}")
        for verified in self.ledger.blocks(start, min(end, head.height)):
            yield BlockData.of(verified)


def _parses(data: BlockData) -> bool:
    try:
        return data.block.header is not None
    except MalformedError:   # verify names it
        return False


def with_cosignatures(verified: VerifiedBlock, cosignatures: Sequence[Cosignature],
                      validators: Collection[str]) -> VerifiedBlock:
    """The block with the co-signatures that finalise it: each valid, each signer once (``VerifiedBlock.cosigned``),
    and every signer a validator of ``validators`` (the set in force before the block), more than half of them
    (``VerifiedBlock.check_final``). The block's proposer need not be among them: a proposer that takes over
    finalises the block its predecessor left prepared (election). BadRequestError otherwise."""
    if not cosignatures:
        raise BadRequestError("commit needs valid co-signatures; none given")
    try:
        final = verified.cosigned(cosignatures)
        final.check_final(validators)
    except VerificationError as exc:
        raise BadRequestError(f"commit refused: {exc}") from exc
    return final
