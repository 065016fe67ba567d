"""console.py as a real subprocess against a real super node (its Admin service) with real edge nodes on loopback:
-c scripts, train/pause/save/eval end to end, probe errors, a pty REPL, and the console's own model checks."""
from __future__ import annotations

import dataclasses
import io
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import text

from chain.block import Cosignature
from chain.keys import NodeKey
from chain.tensors import model_hash
from config import Config
from conftest import free_port, raw_connection
from network import BEAT, MISSED_BEATS, Network, config
from node.console.repl import Console
from node.engine.receipts import ACC_SCALE
from node.engine.views import EvalReport
from node.ledger import Ledger
from node.process.supernode import SuperNode
from node.rpc import serde, transport
from node.rpc.clients import AdminClient
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import BlockView as BlockViewMsg

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = str(ROOT / "console.py")
RUN_TIMEOUT = 120
EDGES = 2   # eval_local, so eval() also reports every edge node


# ---------------------------------------------------------------- a real network: one entry SN, two edge nodes

@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    """The network with a trained chain: genesis and two round blocks."""
    network = Network(tmp_path_factory.mktemp("console-net"), supernodes=1, edges=EDGES, eval_local=True)
    try:
        with AdminClient(network.entry.address) as admin:
            progress = list(admin.train(2))
        assert [p.round for p in progress if p.finished] == [1, 2], [p.message for p in progress]
        yield network
    finally:
        network.close()


def run_console(port: int, script: str | None, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, CONSOLE, "--ip", "127.0.0.1", "--port", str(port)]
    if script is not None:
        args += ["-c", script]
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env={**os.environ, "HOME": str(cwd)})


def saved_hash(path: Path) -> str:
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    return model_hash({k: v.numpy() for k, v in state.items()})


# ---------------------------------------------------------------- -c scripts of read commands

def test_script_runs_every_command_in_order_and_exits_0(net: Network, tmp_path: Path) -> None:
    result = run_console(net.port, "status(); chain(); getBlock(1); verify(); getSN()", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    markers = ["head      height", "height  round  hash", "model hash   ", "OK: ", "kind  node id"]
    positions = [result.stdout.find(m) for m in markers]
    assert -1 not in positions and positions == sorted(positions), result.stdout
    assert "Traceback" not in result.stderr


def test_status_prints_the_head_block_and_round(net: Network, tmp_path: Path) -> None:
    head = net.head()
    result = run_console(net.port, "status()", tmp_path)

    assert f"head      height {head.height}  hash {head.hash}\nmodel     {head.model_hash}\n" \
           f"round     {head.round}\n" in result.stdout


def test_chain_lists_the_blocks_newest_first_with_their_recorded_accuracy(net: Network, tmp_path: Path) -> None:
    head = net.head()
    result = run_console(net.port, "chain()", tmp_path)

    expected = []
    for height in range(head.height, max(-1, head.height - 10), -1):
        h = (block := net.block(height)).header
        accuracy = f"{h.metrics['accuracy_bp'] / ACC_SCALE:.4f}" if "accuracy_bp" in h.metrics else "-"
        expected.append([str(height), str(h.round), block.hash[:16], accuracy])
    assert [line.split()[:4] for line in result.stdout.splitlines()[1:]] == expected


def test_get_block_prints_the_header_and_one_record_per_trainer(net: Network, tmp_path: Path) -> None:
    block = net.block(1)
    result = run_console(net.port, "getBlock(1)", tmp_path)

    assert f"hash         {block.hash}\n" in result.stdout
    assert f"model hash   {block.header.model_hash}\n" in result.stdout
    trainers = re.findall(r"record: trainer (\w+)", result.stdout)
    assert sorted(trainers) == sorted(en.key.node_id for en in net.ens)


def test_verify_reports_ok_with_the_block_count_and_head(net: Network, tmp_path: Path) -> None:
    head = net.head()
    result = run_console(net.port, "verify()", tmp_path)

    assert result.returncode == 0
    assert result.stdout.strip() == f"OK: {head.height + 1} blocks; head {head.height} {head.hash}"


def test_get_sn_lists_the_super_node_and_its_edge_nodes(net: Network, tmp_path: Path) -> None:
    result = run_console(net.port, "getSN()", tmp_path)

    rows = [line.split() for line in result.stdout.splitlines()[1:-1]]
    assert rows[0][:2] == ["SN", net.entry.key.node_id]
    assert sorted(r[:2] for r in rows[1:]) == sorted(["EN", en.key.node_id] for en in net.ens)
    assert result.stdout.splitlines()[-1] == f"1 live super nodes, {EDGES} live edge nodes; 0 dead"


def test_get_model_saves_a_state_dict_that_hashes_to_its_blocks_model_hash(net: Network, tmp_path: Path) -> None:
    expected = net.block(1).header.model_hash
    model_path = tmp_path / "m1.pt"
    result = run_console(net.port, f"getModel(height=1, path='{model_path}')", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"saved to {model_path} (model hash {expected}" in result.stdout
    assert saved_hash(model_path) == expected


def test_get_model_without_arguments_saves_the_head_model_in_the_cwd(net: Network, tmp_path: Path) -> None:
    head = net.head()
    result = run_console(net.port, "getModel", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert saved_hash(tmp_path / f"model-h{head.height}.pt") == head.model_hash


# ---------------------------------------------------------------- errors

def test_mistyped_command_exits_1_with_one_clear_line_and_runs_the_rest(net: Network, tmp_path: Path) -> None:
    result = run_console(net.port, "bogus(); status()", tmp_path)

    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "unknown command 'bogus'; type help"
    assert "head      height" in result.stdout
    assert "Traceback" not in result.stderr


def test_error_reply_exits_1_with_one_line(net: Network, tmp_path: Path) -> None:
    result = run_console(net.port, "getBlock(999999)", tmp_path)

    assert result.returncode == 1
    assert result.stdout.strip() == "getBlock(999999) failed: NOT_FOUND: no block at height 999999"


def test_unreachable_port_exits_2_with_one_line(tmp_path: Path) -> None:
    port = free_port()
    result = run_console(port, "status()", tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "is it running?" in lines[0]


def test_edge_node_address_is_refused_with_exit_2(net: Network, tmp_path: Path) -> None:
    edge = net.ens[0]
    result = run_console(edge.port, "status()", tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip() == f"127.0.0.1:{edge.port} is an edge node; connect the console to a super node"


def test_repl_on_piped_stdin_runs_lines_and_exits_0_on_eof(net: Network, tmp_path: Path) -> None:
    result = run_console(net.port, None, tmp_path, stdin="status()\nbogus\n")

    assert result.returncode == 0, result.stderr
    assert "head      height" in result.stdout
    assert "unknown command 'bogus'; type help" in result.stdout


# ---------------------------------------------------------------- train / pause / save / eval on the real server

ROUND_LINE = re.compile(r"round +(?P<round>\d+)  accuracy (?P<accuracy>\d\.\d{4})  loss (?P<loss>\d+\.\d{4})  "
                        r" *(?P<round_s>\d+\.\d)s  block (?P<height>\d+) (?P<hash>[0-9a-f]{12})  "
                        r"participants (?P<participants>\d+)  failures (?P<failures>\d+)")


@pytest.fixture(scope="module")
def trained(net: Network, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`console.py -c "train(rounds=2)"` run once: its result, wall time and the heads before and after."""
    before = net.head()
    started = time.monotonic()
    result = run_console(net.port, "train(rounds=2)", tmp_path_factory.mktemp("train"))
    wall = time.monotonic() - started
    after = net.head()
    return {"result": result, "wall": wall, "before": before, "after": after,
            "lines": result.stdout.splitlines(), "blocks": [net.block(h) for h in range(before.height + 1,
                                                                                          after.height + 1)]}


def round_lines(trained: dict[str, Any]) -> list[re.Match[str]]:
    """The round lines between the announcement and "training finished", each matched by ROUND_LINE."""
    matches = [ROUND_LINE.match(line) for line in trained["lines"][1:-1]]
    assert all(matches), trained["lines"]
    return matches  # type: ignore[return-value]


def test_train_announces_itself_finishes_and_exits_0(net: Network, trained: dict[str, Any]) -> None:
    result, lines = trained["result"], trained["lines"]

    assert result.returncode == 0, result.stdout + result.stderr
    assert lines[0] == f"training for 2 round(s) on 127.0.0.1:{net.port}; Ctrl-C stops waiting"
    assert lines[-1] == "training finished"


def test_train_prints_one_line_per_round_naming_the_block_it_made(trained: dict[str, Any]) -> None:
    matches = round_lines(trained)

    assert [(int(m["round"]), int(m["height"]), m["hash"], int(m["participants"]), int(m["failures"]))
            for m in matches] == [(b.header.round, b.header.height, b.hash[:12], EDGES, 0) for b in trained["blocks"]]
    assert trained["after"].round == trained["before"].round + 2


def test_train_prints_the_accuracy_each_block_records(trained: dict[str, Any]) -> None:
    printed = [float(m["accuracy"]) for m in round_lines(trained)]
    recorded = [b.header.metrics["accuracy_bp"] / ACC_SCALE for b in trained["blocks"]]

    assert printed == pytest.approx(recorded, abs=1.5e-4)


def test_train_prints_each_rounds_time_from_the_servers_round_s(trained: dict[str, Any]) -> None:
    seconds = [float(m["round_s"]) for m in round_lines(trained)]

    assert len(seconds) == 2 and all(0.0 <= s <= trained["wall"] for s in seconds)


def test_train_exits_1_with_the_note_when_every_edge_node_fails(net: Network, tmp_path: Path) -> None:
    head = net.head()
    for flaky in net.flaky:
        flaky.broken = True
    try:
        result = run_console(net.port, "train(rounds=1)", tmp_path)
    finally:
        for flaky in net.flaky:
            flaky.broken = False

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith(f"round {head.round + 1} failed: ")
    assert net.head() == head


def test_train_exits_1_without_finished_when_no_edge_node_is_registered(tmp_path: Path) -> None:
    cfg = dataclasses.replace(config(tmp_path / "lonely"), is_entry=True)
    lonely = SuperNode(Ledger.open(tmp_path / "lonely", key=NodeKey.from_seed(b"lonely")), "127.0.0.1:0", cfg,
                       heartbeat_interval=BEAT, missed_beats=MISSED_BEATS)
    lonely.start()
    try:
        result = run_console(lonely.port, "train(rounds=3)", tmp_path)
        head = lonely.ledger.head
    finally:
        lonely.stop()

    lines = result.stdout.splitlines()
    assert result.returncode == 1, result.stdout + result.stderr
    assert lines[-1].startswith("round 1 failed: ") and "no live edge node" in lines[-1], lines
    assert "training finished" not in lines, lines
    assert head is not None and head.height == 0   # the genesis block only


class Follower:
    """A console running a long `train(...)` in the background; its output lines arrive on a queue."""

    def __init__(self, port: int, cwd: Path, rounds: int):
        self.proc = subprocess.Popen([sys.executable, CONSOLE, "--ip", "127.0.0.1", "--port", str(port),
                                      "-c", f"train(rounds={rounds})"], cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env={**os.environ, "HOME": str(cwd)})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = RUN_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting {prefix!r}; the console printed:\n" + "\n".join(self.seen))

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def test_pause_from_a_second_console_stops_training_after_the_current_round(net: Network, tmp_path: Path) -> None:
    follower = Follower(net.port, tmp_path, rounds=10_000)
    try:
        follower.wait_for("round ")
        pause = run_console(net.port, "pause()", tmp_path)
        code = follower.finish()
    finally:
        if follower.proc.poll() is None:   # pause did not work: stop the job so the module can go on
            with AdminClient(net.entry.address) as admin:
                admin.pause()
        follower.kill()

    assert pause.returncode == 0 and pause.stdout == "training will stop after the current round\n"
    assert code == 0 and follower.seen[-1] == f"training paused after round {net.head().round}", follower.seen
    assert "training finished" not in follower.seen


def test_save_writes_the_head_model_on_the_super_node_and_says_where(net: Network, tmp_path: Path) -> None:
    head = net.head()
    target = net.root / "entry" / "models" / "saved.pt"     # a relative path is taken inside DATA_ROOT/models
    result = run_console(net.port, "save(path='saved.pt')", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == f"saved on 127.0.0.1:{net.port}: {target} (model hash {head.model_hash})\n"
    assert saved_hash(target) == head.model_hash


@pytest.fixture(scope="module")
def evaluated(net: Network, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], EvalReport]:
    """`console.py -c "eval()"`'s lines, and the same evaluation asked for through the Admin client."""
    result = run_console(net.port, "eval()", tmp_path_factory.mktemp("eval"))
    assert result.returncode == 0, result.stdout + result.stderr
    with AdminClient(net.entry.address) as admin:
        report = admin.evaluate()
    return result.stdout.splitlines(), report


def test_eval_prints_the_global_models_accuracy_and_loss(evaluated: tuple[list[str], EvalReport]) -> None:
    lines, report = evaluated

    assert report.samples > 0
    assert lines[0] == f"global model: accuracy {report.accuracy:.4f}  loss {report.loss:.4f}  on {report.samples} " \
                       f"samples"


def test_eval_prints_a_row_per_edge_node(net: Network, evaluated: tuple[list[str], EvalReport]) -> None:
    lines, report = evaluated

    assert lines[1].split() == ["edge", "node", "accuracy", "loss", "samples", "error"]
    assert [line.split() for line in lines[2:2 + EDGES]] == \
           [[e.node_id, f"{e.accuracy:.4f}", f"{e.loss:.4f}", str(e.samples)] for e in report.edges]
    assert sorted(e.node_id for e in report.edges) == sorted(en.key.node_id for en in net.ens)


def test_eval_prints_the_personalised_accuracy_summary(evaluated: tuple[list[str], EvalReport]) -> None:
    lines, report = evaluated

    assert lines[-1] == f"personalised accuracy: mean {report.edge_accuracy_mean:.4f}  " \
                        f"min {report.edge_accuracy_min:.4f}  max {report.edge_accuracy_max:.4f}"


# ---------------------------------------------------------------- a stored chain that was tampered with

def weights_for(round_: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(round_)
    return {"layer.weight": rng.standard_normal((8, 4)).astype(np.float32),
            "layer.bias": rng.standard_normal(8).astype(np.float32)}


def build_ledger(data_dir: Path, blocks: int = 3) -> list[str]:
    """Genesis + (blocks - 1) round blocks on a real ledger; returns each block's model hash."""
    ledger = Ledger.open(data_dir, key=NodeKey.from_seed(b"console-sn"))
    hashes = []
    try:
        for round_ in range(blocks):
            verified = ledger.build(round=round_, algorithm="fedavg", params={}, weights=weights_for(round_),
                                    records=[], metrics={"accuracy_bp": 5000 + 100 * round_},
                                    timestamp_ms=1_700_000_000_000 + 1000 * round_)
            # its only validator co-signs it, so it is final
            verified = verified.cosigned([Cosignature.create(round_, verified.block.hash, ledger.key)])
            ledger.accept(verified).result()
            hashes.append(verified.block.header.model_hash)
    finally:
        ledger.close()
    return hashes


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperNode]:
    """A super node over a stored chain with one flipped bit in block 1's model."""
    data_dir = tmp_path_factory.mktemp("tampered")
    build_ledger(data_dir)
    with raw_connection(f"sqlite:///{data_dir / 'ledger.db'}") as conn:
        row = conn.execute(text("SELECT data FROM model_chunks WHERE height = 1 AND seq = 0")).one()
        data = bytearray(row.data)
        data[-1] ^= 0x01                                    # one flipped bit in the last weight byte
        conn.execute(text("UPDATE model_chunks SET data = :d WHERE height = 1 AND seq = 0"), {"d": bytes(data)})
    sn = SuperNode(Ledger.open(data_dir, key=NodeKey.from_seed(b"console-sn")), "127.0.0.1:0",
                   Config(data_root=str(data_dir)), heartbeat_interval=BEAT, missed_beats=MISSED_BEATS,
                   genesis=False)
    sn.start()
    try:
        yield sn
    finally:
        sn.stop(None)
        sn.ledger.close()


def test_verify_of_a_tampered_chain_exits_1_with_fail(tampered: SuperNode, tmp_path: Path) -> None:
    result = run_console(tampered.port, "verify()", tmp_path)

    assert result.returncode == 1 and result.stdout.startswith("FAIL: "), result.stdout + result.stderr


def test_tampered_model_is_refused_with_one_line_and_not_saved(tampered: SuperNode, tmp_path: Path) -> None:
    result = run_console(tampered.port, "getModel(height=1, path='bad.pt')", tmp_path)

    assert result.returncode == 1 and len(result.stdout.strip().splitlines()) == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad.pt").exists()


class LyingSuperNode(fledger_pb2_grpc.SuperNodeServicer):
    """Serves other weights than the chain records, in a chunk stream that is consistent in itself."""

    def GetModel(self, request, context):  # noqa: ANN001, ANN201
        yield from transport.send_weights(weights_for(100))


class BlockAdmin(fledger_pb2_grpc.AdminServicer):
    """Only GetBlock, straight from a real ledger."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def GetBlock(self, request, context):  # noqa: ANN001, ANN201
        block, records = self.ledger.get_block(request.height)
        return BlockViewMsg(block=serde.block_to_msg(block), records=[serde.record_to_msg(r) for r in records],
                            hash=block.hash)


def test_model_that_does_not_match_the_chain_is_refused_and_not_saved(tmp_path: Path) -> None:
    data_dir = tmp_path / "sn"
    hashes = build_ledger(data_dir)
    ledger = Ledger.open(data_dir, key=NodeKey.from_seed(b"console-sn"))
    server, port = transport.create_server("127.0.0.1:0", max_workers=4)
    fledger_pb2_grpc.add_SuperNodeServicer_to_server(LyingSuperNode(), server)
    fledger_pb2_grpc.add_AdminServicer_to_server(BlockAdmin(ledger), server)
    server.start()
    out = io.StringIO()
    try:
        with Console(f"127.0.0.1:{port}", out=out) as console:
            ok = console.run_command(f"getModel(height=1, path='{tmp_path / 'bad.pt'}')")
    finally:
        server.stop(None).wait()
        ledger.close()

    assert ok is False
    assert out.getvalue().strip() == (f"model 1 from 127.0.0.1:{port} hashes to {model_hash(weights_for(100))}, "
                                      f"but block 1 records {hashes[1]}; not saved")
    assert not (tmp_path / "bad.pt").exists()


# ---------------------------------------------------------------- a real terminal

class Terminal:
    """console.py on a pseudo-terminal: type lines, read until some text appears."""

    def __init__(self, port: int, home: Path):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, CONSOLE, "--ip", "127.0.0.1", "--port", str(port)],
                                     stdin=slave, stdout=slave, stderr=slave, cwd=home, close_fds=True,
                                     env={**os.environ, "HOME": str(home), "TERM": "dumb"})
        os.close(slave)
        self.seen = ""

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    def expect(self, needle: str, timeout: float = 30.0) -> str:
        """Read until ``needle`` appears after what earlier calls consumed; return the text up to it."""
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.master], [], [], left)[0]:
                raise AssertionError(f"{needle!r} did not appear; terminal showed:\n{self.seen}")
            try:
                chunk = os.read(self.master, 4096)
            except OSError:   # EIO: the child closed the terminal
                raise AssertionError(f"{needle!r} did not appear; terminal showed:\n{self.seen}") from None
            self.seen += chunk.decode(errors="replace").replace("\r\n", "\n")
        before, _, self.seen = self.seen.partition(needle)
        return before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def test_pty_session_survives_a_bogus_line_and_quits_with_0(net: Network, tmp_path: Path) -> None:
    term = Terminal(net.port, tmp_path)
    try:
        term.expect("fledger> ")
        term.type("status()")
        assert "head      height" in term.expect("fledger> ")
        term.type("bogus")
        assert "unknown command 'bogus'; type help" in term.expect("fledger> ")
        term.type("help")
        assert "getModel" in term.expect("fledger> ")
        term.type("quit()")
        code = term.proc.wait(timeout=RUN_TIMEOUT)
    finally:
        term.close()

    assert code == 0
    assert "status()" in (tmp_path / ".fledger_console_history").read_text()
