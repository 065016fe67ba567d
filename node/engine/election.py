"""Who proposes, and how another validator takes over without ever letting two blocks be final at one height.

Proposers take turns by *view*: view ``v`` is led by the validator at position ``v mod n`` of the validator set
ordered by node id and rotated so that the chain's authority (the genesis proposer) leads view 0. Each validator
keeps, durably, the newest view it follows and the block it holds *prepared* (verified, written to a journal and
co-signed, not yet committed). The protocol is single-decree Paxos per height with a stable leader:

* To lead, a validator picks its next view ``v`` and asks every validator to *promise* it: follow ``v`` and refuse
  any older view. A promise carries the validator's head and its prepared block. With promises from a strict
  majority, the new proposer first syncs to the highest head it was shown, then re-proposes the prepared block of
  the newest view at its next height, if any, before anything new.
* A validator co-signs a block only in a view it follows, after writing it to its journal (``prepare``); it holds
  one prepared block per height and replaces it only by one from a newer view.
* A block is final once a strict majority has prepared it. Any later leader's majority of promises meets that
  majority in at least one validator, which reports the block, so the later leader re-proposes the very same
  block: two different blocks can never both be final at one height.

The state lives in ``consensus.json`` and ``prepared.blk`` in the node's data folder (or only in memory for the
simulator). The journal is a plain length-prefixed file, never a pickle; a damaged one is ignored with a warning.
"""
from __future__ import annotations

import json
import logging
import re
import struct
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from chain.block import SignedBlock, SignedRecord
from chain.keys import node_id_for
from chain.private import write_private
from chain.updates import RecordedUpdate
from chain.verify import VerifiedBlock
from node.engine.errors import PreconditionError
from node.engine.types import BlockData, ChainHead, Promise

log = logging.getLogger(__name__)

STATE_FILE = "consensus.json"
PREPARED_FILE = "prepared.blk"
_MAGIC = b"fledger-prepared-2\n"   # 2: with the record count and recorded updates
_SUPERSEDED = re.compile(r"superseded: this node follows view (\d+)")


class SupersededError(PreconditionError):
    """A proposer of an older view was refused: the validator follows a newer view (and its proposer)."""

    def __init__(self, message: str, view: int = 0):
        super().__init__(message)
        self.view = view

    @classmethod
    def following(cls, view: int, proposer: str) -> SupersededError:
        return cls(f"superseded: this node follows view {view} (proposer {proposer})", view)

    @staticmethod
    def view_in(message: str) -> int | None:
        """The view named by a SupersededError's message as it comes back over the wire (None: another error)."""
        match = _SUPERSEDED.search(message)
        return int(match.group(1)) if match else None


def proposer_order(validators: Collection[str], authority: str | None) -> list[str]:
    """The validators' keys in turn order: by node id, rotated so that ``authority`` comes first."""
    keys = sorted(validators, key=node_id_for)
    if authority in keys:
        at = keys.index(authority)
        keys = keys[at:] + keys[:at]
    return keys


def proposer_of(view: int, validators: Collection[str], authority: str | None) -> str | None:
    """The key of the validator that leads ``view`` (None while there is no validator)."""
    order = proposer_order(validators, authority)
    return order[view % len(order)] if order else None


def next_view_for(key: str, after: int, validators: Collection[str], authority: str | None) -> int:
    """The first view after ``after`` that ``key`` leads (ValueError when it is no validator)."""
    order = proposer_order(validators, authority)
    if key not in order:
        raise ValueError("not a validator")
    n, at = len(order), order.index(key)
    view = after + 1
    return view + (at - view) % n


def turn_after(key: str, view: int, validators: Collection[str], authority: str | None) -> int:
    """How many turns after the proposer of ``view`` ``key`` comes (1: next; 0: it leads ``view``)."""
    order = proposer_order(validators, authority)
    if key not in order:
        return 0
    return (order.index(key) - view) % len(order)


@dataclass(frozen=True)
class Prepared:
    """The block a validator holds prepared, and the view it was prepared in."""

    data: BlockData
    view: int

    @property
    def height(self) -> int:
        return self.data.block.header.height

    @property
    def hash(self) -> str:
        return self.data.block.hash


class ConsensusState:
    """One validator's view, prepared block and training target, kept in ``folder`` (None: in memory only)."""

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self._lock = threading.Lock()
        self.view = 0
        self.target_round = 0
        self.plan: dict[str, object] = {}   # the training job's plan (engine.types.Plan fields), as announced
        self._prepared: Prepared | None = None
        if folder is not None:
            self._load(folder)

    # ---- views ----------------------------------------------------------------------------------------------

    def follow(self, view: int, proposer: str = "") -> None:
        """Accept a message of ``view``: raise SupersededError when this node follows a newer view, and move to
        ``view`` (durably) when it is newer than the one followed."""
        with self._lock:
            if view < self.view:
                raise SupersededError.following(self.view, proposer or "?")
            if view > self.view:
                self.view = view
                self._save()

    def set_target(self, target_round: int, plan: dict[str, object] | None = None) -> None:
        """Record the training job: its last round and (from an announcement) its plan, so that a validator that
        takes over continues the same job with the same settings."""
        with self._lock:
            if target_round != self.target_round or (plan is not None and plan != self.plan):
                self.target_round = target_round
                if plan is not None:
                    self.plan = dict(plan)
                self._save()

    # ---- the prepared block ---------------------------------------------------------------------------------

    def prepare(self, verified: VerifiedBlock, view: int) -> None:
        """Hold ``verified`` as this node's prepared block of ``view``, written durably before returning. Raises
        PreconditionError when another block of the same height was prepared in this or a newer view, and
        SupersededError when ``view`` is older than the one followed."""
        data = BlockData.of(verified)
        with self._lock:
            if view < self.view:
                raise SupersededError.following(self.view, "?")
            held = self._prepared
            if held is not None and held.height == data.block.header.height and held.hash != data.block.hash \
                    and held.view >= view:
                raise PreconditionError(f"block {held.height}: block {held.hash[:16]} is already prepared here in "
                                        f"view {held.view}; a view newer than {view} may replace it")
            self._prepared = Prepared(data, view)
            self.view = max(self.view, view)
            if self.folder is not None:
                write_private(self.folder / PREPARED_FILE, _encode(data, view))
                self._save()

    def prepared(self) -> Prepared | None:
        with self._lock:
            return self._prepared

    def discard_through(self, height: int) -> None:
        """Forget the prepared block once the chain reached its height (it is stored, or another one is)."""
        with self._lock:
            held = self._prepared
            if held is None or held.height > height:
                return
            self._prepared = None
            if self.folder is not None:
                (self.folder / PREPARED_FILE).unlink(missing_ok=True)

    def promise(self, view: int, head: ChainHead | None, proposer: str = "") -> Promise:
        """Follow ``view`` (SupersededError when a newer one is followed) and say what this node holds."""
        self.follow(view, proposer)
        held = self.prepared()
        return Promise(self.view, head, (held.height, held.hash, held.view) if held else None, self.target_round)

    # ---- persistence ----------------------------------------------------------------------------------------

    def _save(self) -> None:
        if self.folder is not None:
            write_private(self.folder / STATE_FILE, json.dumps(
                {"view": self.view, "target_round": self.target_round, "plan": self.plan}).encode())

    def _load(self, folder: Path) -> None:
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            self.view, self.target_round = int(state["view"]), int(state["target_round"])
            self.plan = dict(state.get("plan") or {})
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a damaged %s (%s); a view change will bring this node up to date",
                        folder / STATE_FILE, exc)
        try:
            raw = (folder / PREPARED_FILE).read_bytes()
        except FileNotFoundError:
            return
        try:
            data, view = _decode(raw)
        except ValueError as exc:
            log.warning("ignoring a damaged %s (%s)", folder / PREPARED_FILE, exc)
            return
        self._prepared = Prepared(data, view)


def _encode(data: BlockData, view: int) -> bytes:
    """Fields: header, signature, model blob, then two per record, then four per recorded update (record,
    signature, "status\nreason", blob) after a field holding the number of records."""
    fields = [data.block.header_bytes, data.block.signature, data.weights_blob,
              struct.pack(">Q", len(data.records))]
    for record in data.records:
        fields += [record.record_bytes, record.signature]
    for update in data.updates:
        fields += [update.record.record_bytes, update.record.signature,
                   f"{update.status}\n{update.reason}".encode(), update.blob]
    out = [_MAGIC, struct.pack(">QI", view, len(fields))]
    for value in fields:
        out += [struct.pack(">Q", len(value)), value]
    return b"".join(out)


def _decode(raw: bytes) -> tuple[BlockData, int]:
    if not raw.startswith(_MAGIC) or len(raw) < len(_MAGIC) + 12:
        raise ValueError("not a prepared-block journal")
    view, count = struct.unpack_from(">QI", raw, len(_MAGIC))
    at = len(_MAGIC) + 12
    fields: list[bytes] = []
    for _ in range(count):
        if at + 8 > len(raw):
            raise ValueError("truncated")
        (size,) = struct.unpack_from(">Q", raw, at)
        at += 8
        if at + size > len(raw):
            raise ValueError("truncated")
        fields.append(raw[at:at + size])
        at += size
    if at != len(raw) or count < 4 or len(fields[3]) != 8:
        raise ValueError("malformed")
    (n_records,) = struct.unpack(">Q", fields[3])
    first_update = 4 + 2 * n_records
    if first_update > count or (count - first_update) % 4:
        raise ValueError("malformed")
    records = tuple(SignedRecord(fields[i], fields[i + 1]) for i in range(4, first_update, 2))
    updates = []
    for i in range(first_update, count, 4):
        status, _, reason = fields[i + 2].decode("utf-8", "replace").partition("\n")
        updates.append(RecordedUpdate(SignedRecord(fields[i], fields[i + 1]), status, reason, fields[i + 3]))
    return BlockData(SignedBlock(fields[0], fields[1]), records, fields[2], (), tuple(updates)), view


def highest_prepared(promises: Sequence[tuple[str, Promise]], height: int) -> tuple[str, int, str] | None:
    """(node id, view, hash) of the newest-view prepared block at ``height`` among the promises, if any."""
    found = [(p.prepared[2], node_id, p.prepared[1]) for node_id, p in promises
             if p.prepared is not None and p.prepared[0] == height]
    if not found:
        return None
    view, node_id, block_hash = max(found)
    return node_id, view, block_hash
