"""A node's ledger: builds and signs blocks, verifies blocks from peers, writes them in the background, keeps the
signed checkpoint."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from chain.block import Cosignature, MalformedError, SignedBlock, SignedRecord, build_header
from chain.checkpoint import Checkpoint
from chain.keys import NodeKey
from chain.private import PRIVATE_FILE, private_dir, tighten
from chain.tensors import encode_weights, model_hash
from chain.updates import UPDATES_ROOT, RecordedUpdate, updates_root
from chain.validators import MembershipError, validators_after
from chain.verify import Head, VerifiedBlock, VerifyReport, extends, verify_block, verify_chain
from storage.store import LedgerStore, NotExtendingHead
from storage.writer import BackgroundWriter, WriterFailed, describe, is_transient

KEY_FILE = "node.key"
HEAL_WAIT_S = 30.0   # heal() waits this long for its turn on the writer thread and its probe
CHECKPOINT_FILE = "checkpoint.json"
DB_FILE = "ledger.db"

log = logging.getLogger(__name__)


def default_db_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DB_FILE}"


class Ledger:
    """One node's view of the chain: the store plus an in-memory head that runs ahead of the background writer.

    Adding a block is ``build`` (a block this node proposes) or ``verify`` (one received from a peer), which give
    a VerifiedBlock, then ``accept``, which moves the head at once and writes the block in the background, in
    strict order. The store does not verify again. The ledger also keeps the validator set in force at its head
    (chain.validators), and accepts only blocks final under it.

    A write that fails with a transient error is retried for ``retry_for`` seconds (storage.writer). If it still
    fails, the head goes back to the durable head and the ledger turns unhealthy (``healthy``, ``health_reason``);
    ``heal`` checks that the store works again and makes it healthy, with no reopening.
    """

    def __init__(self, store: LedgerStore, key: NodeKey, checkpoint_path: Path | None = None, *,
                 retry_for: float = 10.0):
        self.store = store
        self.key = key
        self.checkpoint_path = checkpoint_path
        self.writer = BackgroundWriter(retry_for=retry_for)
        self._accepting = threading.Lock()   # accept: head check, head move and queueing happen in one order
        self._state = threading.Lock()       # the heads; held only briefly (the writer thread takes it to roll back)
        self._head: Head | None = store.head()
        self._durable: Head | None = self._head   # newest block known to be written
        self._authority: str | None = None
        self._validators: frozenset[str] = self._stored_validators()   # the set in force after the head
        self._durable_validators = self._validators                       # ... and after the durable head
        self._health_reason = ""                                           # why the ledger is unhealthy; "" if not

    @classmethod
    def open(cls, data_dir: str | Path, db_url: str | None = None, key: NodeKey | None = None, *,
             retry_for: float = 10.0) -> Ledger:
        """Open (creating if needed) the node key, the database and the checkpoint path under ``data_dir``."""
        data_dir = private_dir(data_dir)          # 0700; a looser existing one is tightened (logged)
        tighten(data_dir / CHECKPOINT_FILE, PRIVATE_FILE)
        key = key or NodeKey.load_or_create(data_dir / KEY_FILE)
        store = LedgerStore(db_url or default_db_url(data_dir))
        return cls(store, key, data_dir / CHECKPOINT_FILE, retry_for=retry_for)

    # ---- state ----------------------------------------------------------------------------------------------

    @property
    def head(self) -> Head | None:
        """The newest block this node has accepted, possibly still being written (``flush`` waits for it).

        None while the chain is empty. ``Head.round`` is the FL round that block closes.
        """
        return self._head

    @property
    def durable_head(self) -> Head | None:
        """The newest block known to be written to the store (and named by the checkpoint, unless writing it
        failed); None while none is."""
        return self._durable

    @property
    def healthy(self) -> bool:
        """False after a write failed for good or the checkpoint could not be written, until ``heal`` succeeds
        (or a later block is written whole)."""
        return not self._health_reason

    @property
    def health_reason(self) -> str:
        """One line saying why the ledger is unhealthy; "" while it is healthy."""
        return self._health_reason

    @property
    def authority(self) -> str | None:
        """The public key allowed to propose blocks on this chain: its genesis block's proposer (proof of
        authority). None while the chain is empty; LookupError while the genesis block is not written."""
        if self._authority is None and self._head is not None:
            self._authority = self.store.get_block(self._durable_height(0))[0].header.proposer_key
        return self._authority

    @property
    def validators(self) -> frozenset[str]:
        """The validator set in force after the head (public keys, hex): who must co-sign the next block. Empty
        while the chain is empty."""
        return self._validators

    def _stored_validators(self) -> frozenset[str]:
        """The set after the stored head, from one walk over the stored headers. A stored header that does not
        apply (only a tampered database holds one; ``verify_chain`` names it) ends the walk with a warning."""
        validators: frozenset[str] = frozenset()
        for stored in self.store.iter_blocks():
            try:
                validators = validators_after(validators, SignedBlock(stored.header_bytes, stored.signature).header)
            except (MalformedError, MembershipError) as exc:
                log.warning("validator set: block %d does not apply (%s); using the set before it",
                            stored.height, exc)
                break
        return validators

    def close(self) -> None:
        """Write what is queued and release the database; never raises. A write that failed earlier is logged:
        the store keeps every block up to its durable head, and closing must not fail on top of it."""
        self.writer.close()   # writes what is queued first
        if self._health_reason:
            log.error("closing the ledger after a failed write (durable head %s): %s",
                      self._durable.height if self._durable else "none", self._health_reason)
        try:
            self.store.close()
        except Exception as exc:  # noqa: BLE001 - closing must not fail; the database is released either way
            log.error("closing the ledger store failed: %s", describe(exc))

    def flush(self) -> None:
        """Wait until every accepted block is written or has failed (its future says which); never raises.
        Afterwards ``head`` is ``durable_head`` unless more blocks were accepted meanwhile."""
        self.writer.flush()

    def heal(self) -> bool:
        """Check that the store works again after a failure, and if so make the ledger healthy.

        On the writer thread (so after every queued write): probe the store for writes, re-read its head (a write
        whose outcome was unknown may have committed after all: the head, durable head and validator set then
        follow the store), and rewrite the checkpoint of the durable head. True on success; False, with
        ``health_reason`` updated, while the store (or the checkpoint file) still fails, or when the store no
        longer holds the durable head (blocks lost or replaced: that is for ``verify_chain`` and an operator, and
        the checkpoint is left naming the durable head).
        """
        with self._state:
            pending = self._head != self._durable
        if pending:
            self.flush()
        try:
            head = self.writer.submit(self._heal, retry=False).result(timeout=HEAL_WAIT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means: not healed yet
            reason = f"ledger store unavailable: no answer within {HEAL_WAIT_S:g} s" \
                if isinstance(exc, TimeoutError) else _reason(exc)
            self._health_reason = reason
            log.debug("ledger store still failing: %s", reason)
            return False
        log.info("ledger store works again (head %s)", head.height if head is not None else "none")
        return True

    def _heal(self) -> Head | None:
        self.store.probe()
        stored, durable = self.store.head(), self._durable
        if stored != durable:
            if durable is not None and (stored is None or stored.height < durable.height
                                        or self.store.get_block(durable.height)[0].hash != durable.hash):
                raise StoreLost(f"the store's head is {_height(stored)}, and it does not hold this node's durable "
                                f"head {durable.height} ({durable.hash[:16]}...): blocks were lost or replaced; "
                                "run verify")
            validators = self._stored_validators()
            with self._state:
                log.warning("the store's head is %s, not %s as this node believed; following the store",
                            _height(stored), _height(self._durable))
                if self._head == self._durable:   # a block accepted meanwhile fails and rolls back to the store's
                    self._head, self._validators = stored, validators
                self._durable, self._durable_validators = stored, validators
        durable = self._durable
        if durable is not None:
            self._write_checkpoint(durable)
        self._health_reason = ""
        return durable

    def _write_checkpoint(self, head: Head) -> None:
        if self.checkpoint_path is None:
            return
        try:
            Checkpoint.create(head.height, head.hash, self.key).write(self.checkpoint_path)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write the checkpoint: {describe(exc)}") from exc

    # ---- adding blocks --------------------------------------------------------------------------------------

    def build(self, *, round: int, algorithm: str, params: dict[str, Any], weights: dict[str, np.ndarray],
              records: Sequence[SignedRecord], metrics: dict[str, int], timestamp_ms: int,
              weights_blob: bytes | None = None, updates: Sequence[RecordedUpdate] = ()) -> VerifiedBlock:
        """Build and sign the block that would extend the head (genesis on an empty chain), without adding it.

        ``records`` must be receipts whose signatures were checked on arrival; they must be for ``round`` and
        start from the head's model (ValueError otherwise). ``weights_blob``, when given, must be
        ``encode_weights(weights)``; otherwise the weights are encoded here. The weights are hashed once.
        ``updates`` (``--record-updates``: every update the round received, chain.updates) are stored with the
        block, which commits to them with ``params[UPDATES_ROOT]``; their records' signatures and weights must
        have been checked on arrival.
        A proposer that needs co-signatures builds, collects them (``VerifiedBlock.cosigned``), then accepts: its
        ledger never holds a block the other super nodes did not agree to.
        """
        head = self._head
        digest = model_hash(weights)
        base = head.model_hash if head is not None else digest
        for pos, signed in enumerate(records):
            record = signed.record
            if record.round != round or record.base_model_hash != base:
                raise ValueError(f"record {pos} (trainer {record.trainer_id}) is for round {record.round} from "
                                 f"model {record.base_model_hash[:16]}..., not round {round} from {base[:16]}...")
        if updates:
            params = {**params, UPDATES_ROOT: updates_root(updates)}
        header = build_header(prev=head, prev_hash=head.hash if head is not None else None,
                              timestamp_ms=timestamp_ms, round=round, algorithm=algorithm, params=params,
                              model_hash=digest, records=records, metrics=metrics, proposer=self.key)
        blob = weights_blob if weights_blob is not None else encode_weights(weights)
        return VerifiedBlock(SignedBlock.create(header, self.key), tuple(records), blob, updates=tuple(updates))

    def verify(self, block: SignedBlock, records: Iterable[SignedRecord], weights_blob: bytes,
               cosignatures: Iterable[Cosignature] = (), *, final: bool = False,
               updates: Iterable[RecordedUpdate] = ()) -> VerifiedBlock:
        """Verify a block received from elsewhere against this node's head, the chain's authority and the validator
        set in force: a membership change must apply to it, and with ``final`` (a block synced whole, with its
        co-signatures) the block must be final under it. A proposal being co-signed is checked for finality when
        it is committed (``accept``). ``updates`` are the block's recorded updates (chain.updates), checked
        against the root its header commits to.

        Raises NotExtendingHead when it is not the next block after the head (stale, or this node is behind),
        chain.verify.VerificationError when anything else is wrong.
        """
        head = self._head
        try:
            header = block.header
        except MalformedError:
            pass   # verify_block names it
        else:
            if not extends(head, header):
                raise NotExtendingHead(_not_extending(header.height, head))
        authority = self.authority if head is not None else None
        validators = self._validators
        verified = verify_block(block, records, weights_blob, cosignatures, prev=head,
                                authorities=[authority, *validators] if authority is not None else None,
                                validators=validators if final else None, updates=updates)
        verified.validators_after(validators)
        return verified

    def accept(self, verified: VerifiedBlock, client_state: dict[str, bytes] | None = None) -> Future[Head]:
        """Make ``verified`` the head now and queue its write; the future resolves to its Head once durable.

        Raises NotExtendingHead (nothing queued) unless it extends the head, chain.verify.VerificationError
        (nothing queued) unless it is final under the validator set in force (``VerifiedBlock.check_final``). If
        the write fails, the head and the validator set go back to what they were before it.
        """
        header = verified.header
        with self._accepting:
            with self._state:
                previous, before = self._head, self._validators
                if not extends(previous, header):
                    raise NotExtendingHead(_not_extending(header.height, previous))
                after = verified.check_final(before)
                self._head, self._validators = verified.head, after
            future = self.writer.submit(self._write, verified, client_state, after)
        future.add_done_callback(lambda f: self._done(header.height, f))
        return future

    def _done(self, height: int, future: Future[Head]) -> None:
        """If the block's write failed for good (or was cancelled), the head goes back to the durable head, and
        the ledger is unhealthy. Every block queued behind a failed one fails too (WriterFailed), so the head
        returns to the newest block before the first failure; the reason names that first failure."""
        exc = None if future.cancelled() else future.exception()
        if exc is None and not future.cancelled():
            return
        with self._state:
            if self._head is not None and self._head.height >= height:
                self._head, self._validators = self._durable, self._durable_validators
        if exc is not None and not isinstance(exc, WriterFailed):
            self._health_reason = _reason(exc)

    def _write(self, verified: VerifiedBlock, client_state: dict[str, bytes] | None,
               validators: frozenset[str]) -> Head:
        try:
            self.store.append(verified, client_state=client_state)
        except NotExtendingHead:
            # An earlier try whose COMMIT lost its answer (a dropped connection) may have written it after all.
            if self.store.head() != verified.head:
                raise
            log.info("block %d was written by an earlier try", verified.header.height)
        head = verified.head
        with self._state:   # durable from here on, whatever happens to the checkpoint
            self._durable, self._durable_validators = head, validators
        try:
            self._write_checkpoint(head)
        except CheckpointWriteError as exc:
            log.error("block %d is stored, but %s", head.height, exc)
            self._health_reason = str(exc)
        else:
            self._health_reason = ""   # the store and the checkpoint both work again
        return head

    # ---- reading --------------------------------------------------------------------------------------------

    def load_weights(self, height: int | None = None) -> dict[str, np.ndarray]:
        """The model recorded at ``height`` (default: the head), decoded once and checked against its hash."""
        return self.store.load_weights(self._durable_height(height))

    def load_weights_blob(self, height: int) -> bytes:
        """The encoded model recorded at ``height``, checked against its chunk digests only (for serving peers)."""
        return self.store.load_weights_blob(self._durable_height(height))

    def recorded_updates(self, height: int) -> list[RecordedUpdate]:
        """The recorded updates of block ``height`` with their weights (chunk digests checked; [] when it has
        none), after waiting for its write if it is still queued."""
        return self.store.recorded_updates(self._durable_height(height))

    def blocks(self, start: int, end: int | None = None) -> Iterator[VerifiedBlock]:
        """Blocks ``start..end`` (inclusive; default: to the head) with their records, blob, co-signatures and
        recorded updates."""
        if end is None and self._head is None:
            return iter(())
        return self.store.blocks(start, self._durable_height(end))

    def get_block(self, height: int) -> tuple[SignedBlock, list[SignedRecord]]:
        return self.store.get_block(self._durable_height(height))

    def verify_chain(self, check_models: bool = True) -> VerifyReport:
        """Verify the whole stored chain and this node's checkpoint (chain.verify.verify_chain), after waiting
        for queued writes. A store that cannot be read raises what reading it raised."""
        self.flush()
        checkpoint = Checkpoint.read(self.checkpoint_path) if self.checkpoint_path and \
            self.checkpoint_path.exists() else None
        return verify_chain(self.store, check_models=check_models, checkpoint=checkpoint,
                            checkpoint_keys=[self.key.public_hex])

    def _durable_height(self, height: int | None) -> int:
        """``height`` (default: the head's), after waiting for its write if it is still queued; LookupError if
        it is not written even then (its write failed)."""
        if height is None:
            head = self._head
            if head is None:
                raise LookupError("the ledger is empty")
            height = head.height
        durable = self._durable
        if durable is None or durable.height < height:
            self.flush()
            durable = self._durable
            if durable is None or durable.height < height:
                raise LookupError(f"block {height} is not stored here yet")
        return height


class CheckpointWriteError(RuntimeError):
    """The checkpoint file could not be written (the block it names is stored all the same)."""


class StoreLost(RuntimeError):
    """The store no longer holds a block this ledger wrote to it."""


def _reason(exc: BaseException) -> str:
    """The one-line health reason for a failed write or heal: no SQL text, no parameters."""
    if isinstance(exc, (CheckpointWriteError, StoreLost)):
        return str(exc)
    if is_transient(exc):
        return f"ledger store unavailable: {describe(exc)}"
    return f"ledger write failed: {describe(exc)}"


def _height(head: Head | None) -> str:
    return str(head.height) if head is not None else "none"


def store_failure(exc: BaseException) -> str | None:
    """One line naming a storage failure that may pass (the database down or frozen, a locked file, a full disk),
    for a caller that must answer while it lasts; None for any other error."""
    return describe(exc) if is_transient(exc) else None


def _not_extending(height: int, head: Head | None) -> str:
    expected = head.height + 1 if head is not None else 0
    return f"block {height} does not extend this node's head (expected height {expected})"
