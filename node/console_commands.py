"""The console's commands: each is a function of the Console that prints its result or raises ConsoleError."""
from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from chain.block import SignedBlock, SignedRecord
from chain.encoding import EncodingError
from chain.tensors import model_hash
from node import transport
from node.errors import BadRequestError
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import Head as HeadMsg
from proto.fledger_pb2 import Height as HeightMsg
from proto.fledger_pb2 import SaveRequest as SaveRequestMsg
from proto.fledger_pb2 import TrainRequest as TrainRequestMsg

if TYPE_CHECKING:
    from node.console import Console

log = logging.getLogger(__name__)

ACC_SCALE = 10_000          # ledger accuracies are basis points (node.rounds.integer_metrics)
LOSS_SCALE = 1_000_000      # ledger losses are millionths
CHAIN_DEFAULT = 10          # blocks chain() shows by default


class ConsoleError(Exception):
    """A user-facing failure: printed as one line, the console keeps running."""


class Quit(Exception):
    """quit()/exit(): leave the REPL."""


# ---------------------------------------------------------------- helpers

def _int_arg(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConsoleError(f"bad arguments: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _head(con: Console) -> HeadMsg:
    head = con.supernode.GetHead(EmptyMsg(), timeout=con.deadlines.query)
    if head.empty:
        raise ConsoleError(f"the chain on {con.address} is empty (no genesis block yet)")
    return head


def _block(con: Console, height: int) -> tuple[SignedBlock, list[SignedRecord]]:
    """Block ``height`` from Admin.GetBlock with its proposer signature and hash checked."""
    view = con.admin.GetBlock(HeightMsg(height=height), timeout=con.deadlines.query)
    block = SignedBlock(bytes(view.block.header_bytes), bytes(view.block.signature))
    try:
        header = block.check()
    except EncodingError as exc:
        raise ConsoleError(f"block {height} from {con.address} is malformed: {exc}") from None
    if header.height != height or not hmac.compare_digest(block.hash, view.hash):
        raise ConsoleError(f"block {height} from {con.address} does not match its height or hash")
    return block, [SignedRecord(bytes(r.record_bytes), bytes(r.signature)) for r in view.records]


def _metrics_text(metrics: dict[str, int] | dict[str, float]) -> str:
    parts = []
    for name, value in sorted(metrics.items()):
        if name.endswith("_bp"):
            parts.append(f"{name[:-3]} {value / ACC_SCALE:.4f}")
        elif name.endswith("_micro"):
            parts.append(f"{name[:-6]} {value / LOSS_SCALE:.4f}")
        elif isinstance(value, float):
            parts.append(f"{name} {value:.4f}")
        else:
            parts.append(f"{name} {value}")
    return ", ".join(parts) or "-"


def _accuracy(metrics: dict[str, int]) -> str:
    return f"{metrics['accuracy_bp'] / ACC_SCALE:.4f}" if "accuracy_bp" in metrics else "-"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


# ---------------------------------------------------------------- commands

def cmd_help(con: Console, command: str | None = None) -> bool:
    """list the commands, or describe one: help, help("getModel")"""
    if command is not None:
        from node.console import lookup   # late: node.console imports this module
        name, fn = lookup(str(command))
        con.say(f"{name}: {(fn.__doc__ or '').strip()}")
        return True
    width = max(len(n) for n in COMMANDS) + 2
    for name, fn in COMMANDS.items():
        con.say(f"  {name.ljust(width)}{(fn.__doc__ or '').strip()}")
    aliases = ", ".join(f"{a} = {t}" for a, t in ALIAS_DISPLAY.items())
    con.say(f"aliases: {aliases}. Commands work with or without parentheses: getBlock 3, getBlock(3), "
            f"train(rounds=3)")
    return True


def cmd_status(con: Console) -> bool:
    """the node's role, head block, round, members and training state"""
    st = con.admin.Status(EmptyMsg(), timeout=con.deadlines.query)
    con.say(f"node      {st.node_id} ({st.role}) at {con.address}")
    if st.head.empty:
        con.say("head      empty chain (no genesis yet)")
    else:
        con.say(f"head      height {st.head.height}  hash {st.head.hash}")
        con.say(f"model     {st.head.model_hash}")
    con.say(f"round     {st.round}")
    members = f"{st.edges} edge node(s)" + (f", {st.supernodes} super node(s) registered" if st.role == "entry"
                                             else "")
    con.say(f"members   {members}")
    state = "paused" if st.paused else ("running" if st.training else "idle")
    con.say(f"training  {state}")
    return True


def cmd_train(con: Console, rounds: int = 0) -> bool:
    """start or resume federated training: train(), train(rounds=N); Ctrl-C stops waiting, not training"""
    rounds = _int_arg("rounds", rounds)
    deadline = con.deadlines.round * max(rounds, 1)
    stream = con.admin.Train(TrainRequestMsg(rounds=rounds), timeout=deadline)
    last, first = time.monotonic(), True
    try:
        for progress in stream:
            if first:   # the call's errors surface on the first read, so announce only once it is accepted
                con.say(f"training {f'for {rounds} round(s)' if rounds else 'with the node defaults'} "
                        f"on {con.address}; Ctrl-C stops waiting")
                first = False
            now = time.monotonic()
            seconds = progress.metrics.get("seconds", now - last)
            last = now
            if not progress.block_hash:   # a note, not a finished round
                con.say(progress.message or f"round {progress.round}")
                continue
            metrics = {k: v for k, v in progress.metrics.items() if k != "seconds"}
            acc = f"{metrics.pop('accuracy'):.4f}" if "accuracy" in metrics else "-"
            loss = f"{metrics.pop('loss'):.4f}" if "loss" in metrics else "-"
            extra = f"  {_metrics_text(metrics)}" if metrics else ""
            note = f"  {progress.message}" if progress.message else ""
            con.say(f"round {progress.round:>4}  accuracy {acc}  loss {loss}  {seconds:6.1f}s  "
                    f"block {progress.height} {progress.block_hash[:12]}  participants {progress.participants}"
                    f"  failures {progress.failures}{extra}{note}")
    except KeyboardInterrupt:
        stream.cancel()
        con.say("stopped waiting; training continues on the node (pause() stops it)")
        return True
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED:
            return True
        raise
    con.say("training finished")
    return True


def cmd_pause(con: Console) -> bool:
    """stop training after the current round"""
    con.admin.Pause(EmptyMsg(), timeout=con.deadlines.query)
    con.say("training will stop after the current round")
    return True


def cmd_save(con: Console, path: str = "") -> bool:
    """write the current global model to a file ON THE SUPER NODE: save(), save(path="...")"""
    if not isinstance(path, str):
        raise ConsoleError(f"bad arguments: path must be a string, got {path!r}")
    reply = con.admin.Save(SaveRequestMsg(path=path), timeout=con.deadlines.block)
    con.say(f"saved on {con.address}: {reply.path} (model hash {reply.model_hash})")
    return True


def cmd_eval(con: Console) -> bool:
    """evaluate the global model on the edge nodes' test data"""
    reply = con.admin.Eval(EmptyMsg(), timeout=con.deadlines.evaluate)
    if reply.samples:
        con.say(f"global model: accuracy {reply.accuracy:.4f}  loss {reply.loss:.4f}  on {reply.samples} samples")
    else:
        con.say("global model: no global evaluation (personalised algorithm)")
    if reply.edges:
        rows = [[e.node_id, "-", "-", "-", e.error] if e.error else
                [e.node_id, f"{e.accuracy:.4f}", f"{e.loss:.4f}", e.samples, ""] for e in reply.edges]
        con.say(table(rows, ["edge node", "accuracy", "loss", "samples", "error"]))
        if any(not e.error for e in reply.edges):
            con.say(f"personalised accuracy: mean {reply.edge_accuracy_mean:.4f}  min {reply.edge_accuracy_min:.4f}"
                    f"  max {reply.edge_accuracy_max:.4f}")
    return all(not e.error for e in reply.edges)


def cmd_get_sn(con: Console) -> bool:
    """list the super nodes and their edge nodes with liveness and load"""
    st = con.admin.Status(EmptyMsg(), timeout=con.deadlines.query)
    members = list(con.admin.ListNodes(EmptyMsg(), timeout=con.deadlines.query).members)
    sns = [m for m in members if m.role != "edge"]
    edges: dict[str, list] = {}
    for m in members:
        if m.role == "edge":
            edges.setdefault(m.parent_id, []).append(m)
    rows = []
    for sn in sns:
        note = ", ".join(x for x in (sn.role, "this node" if sn.info.node_id == st.node_id else "") if x)
        rows.append(["SN", sn.info.node_id, sn.info.address, _liveness(sn),
                     f"{sn.load}/{sn.info.capacity or 'inf'}", note])
        if sn.alive and sn.info.node_id not in edges:
            note = "no edge nodes" if sn.load == 0 else "edge nodes unknown: super node unreachable"
            rows.append(["  EN", "-", "-", "-", "-", note])
        for e in edges.pop(sn.info.node_id, []):
            share = f"share {e.info.partition_index}, " if e.info.HasField("partition_index") else ""
            rows.append(["  EN", e.info.node_id, e.info.address, _liveness(e), "-",
                         f"{share}{e.info.samples} samples"])
    con.say(table(rows, ["kind", "node id", "address", "alive", "load", "note"]))
    live = [m for m in members if m.alive]
    con.say(f"{sum(m.role != 'edge' for m in live)} live super nodes, {sum(m.role == 'edge' for m in live)} live "
            f"edge nodes; {sum(not m.alive for m in members)} dead")
    return True


def _liveness(member) -> str:
    """"yes (0.4 s)": alive, last heard 0.4 s ago; "DEAD (31 s)": dropped, silent that long."""
    return f"{'yes' if member.alive else 'DEAD'} ({member.silent_s:.1f} s)"


def cmd_chain(con: Console, n: int = CHAIN_DEFAULT) -> bool:
    """the most recent blocks: chain(), chain(n=20)"""
    n = _int_arg("n", n, minimum=1)
    head = _head(con)
    rows = []
    for height in range(head.height, max(-1, head.height - n), -1):
        block, _ = _block(con, height)
        h = block.header
        rows.append([h.height, h.round, block.hash[:16], _accuracy(h.metrics), h.participants, h.total_samples,
                     h.algorithm])
    con.say(table(rows, ["height", "round", "hash", "accuracy", "participants", "samples", "algorithm"]))
    return True


def cmd_get_block(con: Console, height: int) -> bool:
    """one block's header and update records: getBlock(3)"""
    height = _int_arg("height", height)
    block, records = _block(con, height)
    h = block.header
    when = datetime.fromtimestamp(h.timestamp_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
    for label, value in [("height", h.height), ("hash", block.hash), ("prev hash", h.prev_hash),
                         ("round", h.round), ("time", when), ("algorithm", f"{h.algorithm} {h.params}"),
                         ("base model", h.base_model_hash), ("model hash", h.model_hash),
                         ("records root", h.records_root), ("participants", h.participants),
                         ("samples", h.total_samples), ("metrics", _metrics_text(h.metrics)),
                         ("proposer", h.proposer_id)]:
        con.say(f"{label:<13}{value}")
    for signed in records:
        try:
            r = signed.record
        except EncodingError as exc:
            con.say(f"  record: malformed ({exc})")
            continue
        con.say(f"  record: trainer {r.trainer_id}  samples {r.samples}  update {r.update_hash[:16]}  "
                f"{_metrics_text(r.metrics)}")
    return True


def cmd_verify(con: Console) -> bool:
    """the super node re-verifies its whole ledger (hashes, links, signatures, models)"""
    reply = con.admin.Verify(EmptyMsg(), timeout=con.deadlines.sync)
    if reply.ok:
        con.say(f"OK: {reply.blocks} blocks; {reply.message}")
        return True
    con.say(f"FAIL: {reply.message}")
    return False


def cmd_get_model(con: Console, height: int | None = None, path: str | None = None) -> bool:
    """download and check a model, save it as a torch state_dict: getModel(), getModel(height=2, path="m.pt")"""
    if height is None:
        height = _head(con).height
    height = _int_arg("height", height)
    if path is not None and not isinstance(path, str):
        raise ConsoleError(f"bad arguments: path must be a string, got {path!r}")
    block, _ = _block(con, height)
    expected = block.header.model_hash
    try:
        weights, _blob = transport.receive_weights(
            con.supernode.GetModel(HeightMsg(height=height), timeout=con.deadlines.sync))
    except BadRequestError as exc:
        raise ConsoleError(f"model {height} from {con.address} failed its check: {exc}") from None
    actual = model_hash(weights)
    if not hmac.compare_digest(actual, expected):
        raise ConsoleError(f"model {height} from {con.address} hashes to {actual}, but block {height} records "
                           f"{expected}; not saved")
    target = Path(path or f"model-h{height}.pt").expanduser()
    _write_state_dict(weights, target)
    con.say(f"model at height {height} saved to {target} (model hash {actual}, {len(weights)} tensors, "
            f"matches block {height})")
    return True


def _write_state_dict(weights: dict, target: Path) -> None:
    """A plain state_dict of tensors, loadable with torch.load(path, weights_only=True); written atomically."""
    import torch   # late: only this command needs torch, and importing it takes seconds

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save({name: torch.from_numpy(array) for name, array in weights.items()}, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConsoleError(f"cannot write {target}: {exc.strerror or exc}") from None


def cmd_quit(con: Console) -> bool:
    """leave the console (also exit() or Ctrl-D)"""
    raise Quit


COMMANDS: dict[str, Callable[..., bool]] = {
    "help": cmd_help,
    "status": cmd_status,
    "train": cmd_train,
    "pause": cmd_pause,
    "save": cmd_save,
    "eval": cmd_eval,
    "getSN": cmd_get_sn,
    "getModel": cmd_get_model,
    "chain": cmd_chain,
    "getBlock": cmd_get_block,
    "verify": cmd_verify,
    "quit": cmd_quit,
}

# Lower-case alias -> lower-case command name. trainFL is kept for the original project's users.
ALIAS_DISPLAY = {"trainFL": "train", "exit": "quit"}
ALIASES = {alias.lower(): target.lower() for alias, target in ALIAS_DISPLAY.items()}
