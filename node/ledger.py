"""A node's ledger: builds and signs blocks, writes them in the background, keeps the signed checkpoint."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chain.block import BlockHeader, Cosignature, SignedBlock, SignedRecord, build_header
from chain.checkpoint import Checkpoint
from chain.keys import NodeKey
from chain.tensors import decode_weights, encode_weights, model_hash
from chain.verify import VerifyReport, verify_chain
from storage.store import LedgerStore, NotExtendingHead
from storage.writer import BackgroundWriter

log = logging.getLogger(__name__)

KEY_FILE = "node.key"
CHECKPOINT_FILE = "checkpoint.json"
DB_FILE = "ledger.db"


def default_db_url(data_dir: str | Path) -> str:
    return f"sqlite:///{Path(data_dir).resolve() / DB_FILE}"


@dataclass(frozen=True)
class Tip:
    """The newest block this node has accepted (possibly still being written)."""

    header: BlockHeader
    hash: str


class Ledger:
    """One node's view of the chain. Appends go through a background writer in strict order."""

    def __init__(self, store: LedgerStore, key: NodeKey, checkpoint_path: Path | None = None):
        self.store = store
        self.key = key
        self.checkpoint_path = checkpoint_path
        self.writer = BackgroundWriter()
        self._lock = threading.RLock()   # propose holds it around build
        self._tip: Tip | None = None
        self._authority: str | None = None
        head = store.head()
        if head is not None:
            block, _ = store.get_block(head.height)
            self._tip = Tip(block.header, block.hash)

    @classmethod
    def open(cls, data_dir: str | Path, db_url: str | None = None, key: NodeKey | None = None) -> "Ledger":
        """Open (creating if needed) the node key, the database and the checkpoint path under ``data_dir``."""
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        key = key or NodeKey.load_or_create(data_dir / KEY_FILE)
        store = LedgerStore(db_url or default_db_url(data_dir))
        return cls(store, key, data_dir / CHECKPOINT_FILE)

    # ---- state ----------------------------------------------------------------------------------------------

    @property
    def tip(self) -> Tip | None:
        return self._tip

    @property
    def authority(self) -> str | None:
        """The public key allowed to propose blocks on this chain: its genesis block's proposer (proof of
        authority). None while the chain is empty."""
        if self._authority is None and self._tip is not None:
            self.flush()
            self._authority = self.store.get_block(0)[0].header.proposer_key
        return self._authority

    def close(self) -> None:
        try:
            self.writer.flush()
        finally:
            self.writer.close()
            self.store.close()

    def flush(self) -> None:
        """Wait until every accepted block is durable."""
        self.writer.flush()

    # ---- proposing ------------------------------------------------------------------------------------------

    def build(self, *, round: int, algorithm: str, params: dict[str, Any], weights: dict[str, np.ndarray],
              records: list[SignedRecord], metrics: dict[str, int], timestamp_ms: int,
              new_model_hash: str | None = None) -> SignedBlock:
        """Build and sign the block that would extend the tip, without adding it (see ``accept``).

        A proposer that needs co-signatures first builds, collects them, then accepts: its ledger never holds
        a block the other super nodes did not agree to.
        """
        with self._lock:
            tip = self._tip
        header = build_header(prev=tip.header if tip else None, prev_hash=tip.hash if tip else None,
                              timestamp_ms=timestamp_ms, round=round, algorithm=algorithm, params=params,
                              model_hash=new_model_hash or model_hash(weights), records=records,
                              metrics=metrics, proposer=self.key)
        return SignedBlock.create(header, self.key)

    def propose(self, *, round: int, algorithm: str, params: dict[str, Any], weights: dict[str, np.ndarray],
                records: list[SignedRecord], metrics: dict[str, int], timestamp_ms: int,
                client_state: dict[str, bytes] | None = None,
                new_model_hash: str | None = None) -> tuple[SignedBlock, Future]:
        """Build and sign the next block (genesis when the chain is empty) and queue it for writing.

        Returns the block at once and a future that resolves when it is durable.
        """
        with self._lock:
            block = self.build(round=round, algorithm=algorithm, params=params, weights=weights, records=records,
                               metrics=metrics, timestamp_ms=timestamp_ms, new_model_hash=new_model_hash)
            self._tip = Tip(block.header, block.hash)
        # Encode now, not on the writer thread: the caller may reuse its arrays once we return.
        blob = encode_weights(weights)
        future = self.writer.submit(self._write, block, records, lambda: blob, (), client_state)
        return block, future

    def accept(self, block: SignedBlock, records: list[SignedRecord], weights_blob: bytes,
               cosignatures: Iterable[Cosignature] = ()) -> Future:
        """Queue a block proposed elsewhere; the store verifies it fully before writing it."""
        with self._lock:
            header = block.header
            expected = self._tip.header.height + 1 if self._tip else 0
            if header.height != expected or (self._tip and header.prev_hash != self._tip.hash):
                raise NotExtendingHead(f"block {header.height} does not extend this node's tip "
                                       f"(expected height {expected})")
            previous = self._tip
            self._tip = Tip(header, block.hash)
        future = self.writer.submit(self._write, block, records, lambda: weights_blob, tuple(cosignatures), None)
        future.add_done_callback(lambda f: self._rollback(previous, block) if f.exception() else None)
        return future

    def _rollback(self, previous: Tip | None, block: SignedBlock) -> None:
        with self._lock:
            if self._tip is not None and self._tip.hash == block.hash:
                self._tip = previous

    def _write(self, block: SignedBlock, records: list[SignedRecord], blob_fn, cosignatures,
               client_state) -> SignedBlock:
        self.store.append(block, records, blob_fn(), cosignatures=cosignatures, client_state=client_state)
        if self.checkpoint_path is not None:
            header = block.header
            Checkpoint.create(header.height, block.hash, self.key).write(self.checkpoint_path)
        return block

    def add_cosignatures(self, height: int, cosignatures: Iterable[Cosignature]) -> Future:
        return self.writer.submit(self.store.add_cosignatures, height, list(cosignatures))

    # ---- reading --------------------------------------------------------------------------------------------

    def load_weights(self, height: int | None = None) -> dict[str, np.ndarray]:
        """The model recorded at ``height`` (default: the durable head), checked against its hash."""
        return decode_weights(self.load_weights_blob(height))

    def load_weights_blob(self, height: int | None = None) -> bytes:
        if height is None:
            self.flush()
            head = self.store.head()
            if head is None:
                raise LookupError("the ledger is empty")
            height = head.height
        return self.store.load_weights_blob(height)

    def get_block(self, height: int) -> tuple[SignedBlock, list[SignedRecord]]:
        return self.store.get_block(height)

    def verify(self, check_models: bool = True) -> VerifyReport:
        self.flush()
        checkpoint = Checkpoint.read(self.checkpoint_path) if self.checkpoint_path and \
            self.checkpoint_path.exists() else None
        return verify_chain(self.store, check_models=check_models, checkpoint=checkpoint,
                            checkpoint_keys=[self.key.public_hex])
