"""The console's commands: each is a function of a Session (the console) that prints its result or raises
ConsoleError; the table of commands and its lookup."""
from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from chain.block import SignedBlock, SignedRecord
from chain.updates import AGGREGATE, EXCLUDED, UPDATES_ROOT, excluded_of
from node.console.parse import ConsoleError
from node.engine.errors import BadRequestError, NetError
from node.engine.receipts import ACC_SCALE, LOSS_SCALE
from node.engine.types import SIM, ChainHead
from node.engine.views import MemberView
from node.rpc.clients import AdminClient, RoundLine

CHAIN_DEFAULT = 10          # blocks chain() shows by default
EXCLUDED_SHOWN = 8          # excluded edge nodes train() lists under a round, one line each


class Quit(Exception):
    """quit()/exit(): leave the REPL."""


class Session(Protocol):
    """What a command needs: the node's address, its Admin client, and somewhere to print."""

    address: str
    admin: AdminClient

    def say(self, text: str = "") -> None: ...



# ---------------------------------------------------------------- helpers

def _int_arg(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConsoleError(f"bad arguments: {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _head(con: Session) -> ChainHead:
    head = con.admin.status().head
    if head is None:
        raise ConsoleError(f"the chain on {con.address} is empty (no genesis block yet)")
    return head


def _block(con: Session, height: int) -> tuple[SignedBlock, list[SignedRecord]]:
    """Block ``height`` with its proposer's and trainers' signatures and its hash checked."""
    try:
        view = con.admin.block(height)
    except BadRequestError as exc:
        if exc.status:   # the node refused the request itself
            raise
        raise ConsoleError(f"block {height} from {con.address} is malformed: {exc}") from None
    if view.block.header.height != height:
        raise ConsoleError(f"block {height} from {con.address} does not match its height or hash")
    return view.block, view.records


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
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


# ---------------------------------------------------------------- commands

def cmd_help(con: Session, command: str | None = None) -> bool:
    """list the commands, or describe one: help, help("getModel")"""
    if command is not None:
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


def cmd_status(con: Session) -> bool:
    """the node's role, head block, round, members and training state"""
    st = con.admin.status()
    con.say(f"node      {st.node_id} ({st.role}) at {con.address}")
    if st.head is None:
        con.say("head      empty chain (no genesis yet)")
    else:
        con.say(f"head      height {st.head.height}  hash {st.head.hash}")
        con.say(f"model     {st.head.model_hash}")
    con.say(f"round     {st.round}")
    members = f"{st.edges} edge node(s)" + (f", {st.supernodes} super node(s) registered" if st.role == "entry"
                                             else "")
    con.say(f"members   {members}")
    con.say(f"validators {len(st.validators)}: {', '.join(st.validators) or 'none (empty chain)'}")
    if st.proposer:
        con.say(f"proposer  {st.proposer} (view {st.view})" + ("  this node" if st.proposer == st.node_id else ""))
    state = "paused" if st.paused else ("running" if st.training else "idle")
    con.say(f"training  {state}")
    con.say(f"ledger    {'CANNOT WRITE: ' + st.ledger_error if st.ledger_error else 'ok'} "
            "(the head above is durable)")
    return True


def cmd_train(con: Session, rounds: int = 0) -> bool:
    """start or resume federated training: train(), train(rounds=N); Ctrl-C stops waiting, not training"""
    rounds = _int_arg("rounds", rounds)
    lines = con.admin.train(rounds)
    first = True
    paused: int | None = None
    try:
        for line in lines:
            if first:   # the call's errors surface on the first read, so announce only once it is accepted
                con.say(f"training {f'for {rounds} round(s)' if rounds else 'with the node defaults'} "
                        f"on {con.address}; Ctrl-C stops waiting")
                first = False
            if not line.finished:
                if training_failed(line):
                    con.say(line.message or f"round {line.round} failed")
                    return False
                if PAUSED.match(line.message):
                    paused = line.round
                    continue
                con.say(line.message or f"round {line.round}")
                continue
            metrics = dict(line.metrics)
            acc = f"{metrics.pop('accuracy'):.4f}" if "accuracy" in metrics else "-"
            loss = f"{metrics.pop('loss'):.4f}" if "loss" in metrics else "-"
            extra = f"  {_metrics_text(metrics)}" if metrics else ""
            note = f"  {line.message}" if line.message else ""
            seconds = f"{line.timings['round_s']:6.1f}s  " if "round_s" in line.timings else ""
            if "sim_round_s" in line.timings and "sim_time_s" in line.timings:
                seconds += f"sim {line.timings['sim_round_s']:.1f}s (clock {line.timings['sim_time_s']:.1f}s)  "
            con.say(f"round {line.round:>4}  accuracy {acc}  loss {loss}  {seconds}"
                    f"block {line.height} {line.block_hash[:12]}  participants {line.participants}"
                    f"  failures {line.failures}{extra}{note}")
            for edge, why in line.excluded[:EXCLUDED_SHOWN]:
                con.say(f"           excluded: {edge[:12]} ({why})")
            if len(line.excluded) > EXCLUDED_SHOWN:
                con.say(f"           excluded: and {len(line.excluded) - EXCLUDED_SHOWN} more")
            for edge, why in line.dropped[:EXCLUDED_SHOWN]:
                con.say(f"           dropped: {edge[:12]} ({why})")
            if len(line.dropped) > EXCLUDED_SHOWN:
                con.say(f"           dropped: and {len(line.dropped) - EXCLUDED_SHOWN} more")
    except KeyboardInterrupt:
        lines.close()
        con.say("stopped waiting; training continues on the node (pause() stops it)")
        return True
    except NetError as exc:
        if exc.status == "CANCELLED":   # the node stopped mid-stream: training did not finish
            con.say(f"training stream cancelled by {con.address}; training may not have finished")
            return False
        raise
    con.say("training finished" if paused is None else f"training paused after round {paused}")
    return True


PAUSED = re.compile(r"paused after round (\d+)$")


def training_failed(line: RoundLine) -> bool:
    """A note saying training stopped on an error (the node's flag). A failed round that the node retries is
    not one: training goes on."""
    return line.error


def cmd_pause(con: Session) -> bool:
    """stop training after the current round"""
    con.admin.pause()
    con.say("training will stop after the current round")
    return True


def cmd_save(con: Session, path: str = "") -> bool:
    """write the current global model ON THE SUPER NODE, in its DATA_ROOT/models: save(), save(path="name.pt")"""
    if not isinstance(path, str):
        raise ConsoleError(f"bad arguments: path must be a string, got {path!r}")
    saved, digest = con.admin.save(path)
    con.say(f"saved on {con.address}: {saved} (model hash {digest})")
    return True


def cmd_eval(con: Session) -> bool:
    """evaluate the global model on the edge nodes' test data"""
    reply = con.admin.evaluate()
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


def cmd_get_sn(con: Session) -> bool:
    """list the super nodes and their edge nodes with liveness and load"""
    st = con.admin.status()
    members = con.admin.nodes()
    sns = [m for m in members if m.role != "edge"]
    edges: dict[str, list[MemberView]] = {}
    for m in members:
        if m.role == "edge":
            edges.setdefault(m.parent_id, []).append(m)
    rows = []
    validators = set(st.validators)
    for sn in sns:
        note = ", ".join(x for x in (sn.role, "validator" if sn.node_id in validators else "",
                                     "this node" if sn.node_id == st.node_id else "") if x)
        rows.append(["SN", sn.node_id, sn.address, _liveness(sn), f"{sn.load}/{sn.capacity or 'inf'}", note])
        if sn.unreachable:
            rows.append(["  EN", "-", "-", "-", "-", f"edge nodes unknown: {sn.unreachable}"])
        elif sn.alive and sn.node_id not in edges:
            note = "no edge nodes" if sn.load == 0 else "edge nodes unknown: super node unreachable"
            rows.append(["  EN", "-", "-", "-", "-", note])
        for e in edges.pop(sn.node_id, []):
            share = f"share {e.share}, " if e.share is not None else ""
            rows.append(["  EN", e.node_id, e.address, _liveness(e), "-", f"{share}{e.samples} samples"])
    con.say(table(rows, ["kind", "node id", "address", "alive", "load", "note"]))
    live = [m for m in members if m.alive]
    con.say(f"{sum(m.role != 'edge' for m in live)} live super nodes, {sum(m.role == 'edge' for m in live)} live "
            f"edge nodes; {sum(not m.alive for m in members)} dead")
    unlisted = sorted(validators - {sn.node_id for sn in sns})
    if unlisted:
        con.say(f"validators not listed here (never registered or forgotten): {', '.join(unlisted)}")
    return True


def _liveness(member: MemberView) -> str:
    """"yes (0.4 s)": alive, last heard 0.4 s ago; "DEAD (31 s)": dropped, silent that long."""
    return f"{'yes' if member.alive else 'DEAD'} ({member.silent_s:.1f} s)"


def cmd_chain(con: Session, n: int = CHAIN_DEFAULT) -> bool:
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


def cmd_get_block(con: Session, height: int) -> bool:
    """one block's header and update records: getBlock(3)"""
    height = _int_arg("height", height)
    block, records = _block(con, height)
    h = block.header
    when = datetime.fromtimestamp(h.timestamp_ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")
    # the aggregation rule, the exclusions and the updates root get lines of their own below
    algo_params = {k: v for k, v in h.params.items() if k not in (AGGREGATE, EXCLUDED, UPDATES_ROOT, SIM)}
    for label, value in [("height", h.height), ("hash", block.hash), ("prev hash", h.prev_hash),
                         ("round", h.round), ("time", when), ("algorithm", f"{h.algorithm} {algo_params}"),
                         ("aggregation", h.params.get(AGGREGATE, "fedavg")),
                         ("base model", h.base_model_hash), ("model hash", h.model_hash),
                         ("records root", h.records_root), ("participants", h.participants),
                         ("samples", h.total_samples), ("metrics", _metrics_text(h.metrics)),
                         ("proposer", h.proposer_id)]:
        con.say(f"{label:<13}{value}")
    if UPDATES_ROOT in h.params:
        con.say(f"recorded updates: yes (root {str(h.params[UPDATES_ROOT])[:16]})")
    for signed in records:
        r = signed.record
        con.say(f"  record: trainer {r.trainer_id}  samples {r.samples}  update {r.update_hash[:16]}  "
                f"{_metrics_text(r.metrics)}")
    for trainer, why in excluded_of(h.params):
        con.say(f"  excluded: trainer {trainer}  {why}")
    sim = h.params.get(SIM)
    if isinstance(sim, dict):   # a scenario's round: its simulated time and who was dropped (node.engine.clock)
        round_ms, clock_ms = sim.get("round_ms", 0), sim.get("clock_ms", 0)
        con.say(f"simulated    round {round_ms / 1000:.3f} s, clock {clock_ms / 1000:.3f} s")
        for entry in sim.get("dropped", []) if isinstance(sim.get("dropped"), list) else []:
            if isinstance(entry, list) and len(entry) == 2:
                con.say(f"  dropped: edge {entry[0]}  {entry[1]}")
    return True


def cmd_verify(con: Session) -> bool:
    """the super node re-verifies its whole ledger (hashes, links, signatures, models)"""
    ok, blocks, message = con.admin.verify()
    if ok:
        con.say(f"OK: {blocks} blocks; {message}")
        return True
    con.say(f"FAIL: {message}")
    return False


def cmd_remove_sn(con: Session, node_id: str) -> bool:
    """remove a super node from the validator set by a block (entry only): removeSN("3fa2") takes an id or a
    unique prefix of one, as getSN() shows them"""
    if not isinstance(node_id, str) or not node_id:
        raise ConsoleError(f"bad arguments: removeSN takes a super node id (or a unique prefix), got {node_id!r}")
    result = con.admin.remove_supernode(_validator_id(con, node_id))
    con.say(f"removed in block {result.height} {result.hash[:16]}; {len(result.validators)} validators: "
            f"{', '.join(result.validators)}")
    return True


def _validator_id(con: Session, prefix: str) -> str:
    """The one validator id (or registered super node id) that starts with ``prefix``."""
    known = set(con.admin.status().validators) | {m.node_id for m in con.admin.nodes() if m.role != "edge"}
    matches = sorted(n for n in known if n.startswith(prefix.lower()))
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ConsoleError(f"no super node id starts with {prefix!r}; getSN() lists them")
    raise ConsoleError(f"{prefix!r} is the start of {len(matches)} super node ids ({', '.join(matches)}); "
                       "give more of it")


def cmd_get_model(con: Session, height: int | None = None, path: str | None = None) -> bool:
    """download and check a model, save it as a torch state_dict: getModel(), getModel(height=2, path="m.pt")"""
    if height is None:
        height = _head(con).height
    height = _int_arg("height", height)
    if path is not None and not isinstance(path, str):
        raise ConsoleError(f"bad arguments: path must be a string, got {path!r}")
    block, _ = _block(con, height)
    expected = block.header.model_hash
    try:
        weights, actual = con.admin.model(height)
    except BadRequestError as exc:
        if exc.status:
            raise
        raise ConsoleError(f"model {height} from {con.address} failed its check: {exc}") from None
    if not hmac.compare_digest(actual, expected):
        raise ConsoleError(f"model {height} from {con.address} hashes to {actual}, but block {height} records "
                           f"{expected}; not saved")
    target = Path(path or f"model-h{height}.pt").expanduser()
    _write_state_dict(weights, target)
    con.say(f"model at height {height} saved to {target} (model hash {actual}, {len(weights)} tensors, "
            f"matches block {height})")
    return True


def _write_state_dict(weights: dict[str, np.ndarray], target: Path) -> None:
    """A plain state_dict of tensors, loadable with torch.load(path, weights_only=True); written atomically."""
    import torch  # late: only this command needs torch, and importing it takes seconds

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        torch.save({name: torch.from_numpy(array) for name, array in weights.items()}, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConsoleError(f"cannot write {target}: {exc.strerror or exc}") from None


def cmd_tokens(con: Session) -> bool:
    """print the join tokens of a secure network (entry only): nodes join with --join TOKEN"""
    tokens = con.admin.tokens()
    con.say(f"super nodes: {tokens['supernode']}")
    con.say(f"edge nodes:  {tokens['edge']}")
    return True


def cmd_rotate_token(con: Session, role: str) -> bool:
    """revoke a join token and issue a new one: rotateToken("supernode") or rotateToken("edge")"""
    if role not in ("supernode", "edge"):
        raise ConsoleError('bad arguments: rotateToken takes "supernode" or "edge"')
    tokens = con.admin.rotate_token(role)
    con.say(f"the old {role} token is revoked; the new one: {tokens[role]}")
    return True


def cmd_quit(con: Session) -> bool:
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
    "removeSN": cmd_remove_sn,
    "getModel": cmd_get_model,
    "chain": cmd_chain,
    "getBlock": cmd_get_block,
    "verify": cmd_verify,
    "tokens": cmd_tokens,
    "rotateToken": cmd_rotate_token,
    "quit": cmd_quit,
}

# Lower-case alias -> lower-case command name. trainFL is kept for the original project's users.
ALIAS_DISPLAY = {"trainFL": "train", "exit": "quit"}
ALIASES = {alias.lower(): target.lower() for alias, target in ALIAS_DISPLAY.items()}


def lookup(name: str) -> tuple[str, Callable[..., bool]]:
    """The canonical command name and its function; names are matched case-insensitively."""
    key = name.lower()
    key = ALIASES.get(key, key)
    for canonical, fn in COMMANDS.items():
        if canonical.lower() == key:
            return canonical, fn
    raise ConsoleError(f"unknown command {name!r}; type help")
