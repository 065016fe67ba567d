"""console.py as a real subprocess against real super/edge nodes on loopback: -c scripts, probe errors, a pty REPL."""
from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, raw_connection, wait_until
from sqlalchemy import text

from chain.keys import NodeKey
from chain.tensors import model_hash
from fl.data import Dataset
from fl.models import build_model
from fl.local import InProcessParticipant, Workbench
from node.rpc import serde
from node.rpc import transport
from node.console.repl import Console
from node.process.edge import EdgeNode
from node.ledger import Ledger
from node.process.supernode import SuperNode
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import BlockView as BlockViewMsg
from proto.fledger_pb2 import EdgeEval as EdgeEvalMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import EvalReply as EvalReplyMsg
from proto.fledger_pb2 import SaveReply as SaveReplyMsg
from proto.fledger_pb2 import TrainProgress as TrainProgressMsg

ROOT = Path(__file__).resolve().parents[1]
CONSOLE = str(ROOT / "console.py")
RUN_TIMEOUT = 60


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
            block, durable = ledger.propose(round=round_, algorithm="fedavg", params={}, weights=weights_for(round_),
                                            records=[], metrics={"accuracy_bp": 5000 + 100 * round_},
                                            timestamp_ms=1_700_000_000_000 + 1000 * round_)
            durable.result()
            hashes.append(block.header.model_hash)
    finally:
        ledger.close()
    return hashes


def start_sn(data_dir: Path) -> SuperNode:
    sn = SuperNode(NodeKey.from_seed(b"console-sn"), Ledger.open(data_dir, key=NodeKey.from_seed(b"console-sn")),
                   "127.0.0.1:0", heartbeat_interval=0.2)
    sn.start()
    return sn


def stop_sn(sn: SuperNode) -> None:
    sn.stop(None)
    sn.ledger.close()


def tiny_participant(pid: str) -> InProcessParticipant:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    data = Dataset("mnist", x, y, x[:4], y[:4], 10, (1, 28, 28), "synthetic")
    model = build_model("2nn")
    return InProcessParticipant(pid, data, np.arange(12), np.arange(12, 16), Workbench(model),
                                list(model.state_dict()))



@pytest.fixture(scope="module")
def network(tmp_path_factory) -> Iterator[tuple[SuperNode, EdgeNode, list[str]]]:
    """An entry SN with a 3-block chain and one real edge node registered with it."""
    data_dir = tmp_path_factory.mktemp("console-sn")
    hashes = build_ledger(data_dir)
    sn = start_sn(data_dir)
    key = NodeKey.from_seed(b"console-en")
    edge = EdgeNode(key, tiny_participant(key.node_id), "127.0.0.1:0", entry=sn.address, samples=12,
                    heartbeat_interval=0.2)
    edge.start()
    try:
        assert wait_until(lambda: len(sn.edges) == 1), "edge node did not join the super node"
        yield sn, edge, hashes
    finally:
        edge.stop(None)
        stop_sn(sn)


def run_console(port: int, script: str | None, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, CONSOLE, "--ip", "127.0.0.1", "--port", str(port)]
    if script is not None:
        args += ["-c", script]
    return subprocess.run(args, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT,
                          env={**os.environ, "HOME": str(cwd)})


# ---------------------------------------------------------------- -c scripts

def test_script_of_read_commands_succeeds_and_downloads_a_checked_model(network, tmp_path) -> None:
    sn, edge, hashes = network
    model_path = tmp_path / "m1.pt"
    result = run_console(sn.port, f"status(); chain(); getBlock(1); verify(); getSN(); "
                                  f"getModel(height=1, path='{model_path}')", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"head      height 2  hash {sn.ledger.tip.hash}" in out and "round     2" in out
    assert "0.5200" in out and "0.5100" in out                          # chain(): accuracies per block
    assert f"model hash   {hashes[1]}" in out                          # getBlock(1)
    assert "OK: 3 blocks; head 2" in out                                # verify()
    assert edge.key.node_id in out and sn.key.node_id in out            # getSN(): the SN and its EN
    assert f"saved to {model_path}" in out and hashes[1] in out
    assert "Traceback" not in result.stderr
    state = torch.load(model_path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert model_hash({k: v.numpy() for k, v in state.items()}) == hashes[1]


def test_get_model_without_arguments_saves_the_head_model_in_the_cwd(network, tmp_path) -> None:
    sn, _edge, hashes = network
    result = run_console(sn.port, "getModel", tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    state = torch.load(tmp_path / "model-h2.pt", weights_only=True)
    assert model_hash({k: v.numpy() for k, v in state.items()}) == hashes[2]


def test_mistyped_command_exits_1_with_one_clear_line_and_runs_the_rest(network, tmp_path) -> None:
    sn, _edge, _hashes = network
    result = run_console(sn.port, "bogus(); status()", tmp_path)

    assert result.returncode == 1
    assert result.stdout.splitlines()[0] == "unknown command 'bogus'; type help"
    assert "head      height 2" in result.stdout
    assert "Traceback" not in result.stderr


def test_error_reply_exits_1_with_one_line(network, tmp_path) -> None:
    sn, _edge, _hashes = network
    result = run_console(sn.port, "getBlock(99)", tmp_path)

    assert result.returncode == 1
    assert result.stdout.strip() == "getBlock(99) failed: NOT_FOUND: no block at height 99"


def test_unreachable_port_exits_2_with_one_line(tmp_path) -> None:
    port = free_port()
    result = run_console(port, "status()", tmp_path)

    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "is it running?" in lines[0]


def test_edge_node_address_is_refused_with_exit_2(network, tmp_path) -> None:
    _sn, edge, _hashes = network
    result = run_console(edge.port, "status()", tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip() == f"127.0.0.1:{edge.port} is an edge node; connect the console to a super node"


def test_repl_on_piped_stdin_runs_lines_and_exits_0_on_eof(network, tmp_path) -> None:
    sn, _edge, _hashes = network
    result = run_console(sn.port, None, tmp_path, stdin="status()\nbogus\n")

    assert result.returncode == 0, result.stderr
    assert "head      height 2" in result.stdout
    assert "unknown command 'bogus'; type help" in result.stdout


def test_tampered_model_is_refused_and_not_saved(tmp_path) -> None:
    data_dir = tmp_path / "sn"
    build_ledger(data_dir)
    with raw_connection(f"sqlite:///{data_dir / 'ledger.db'}") as conn:
        row = conn.execute(text("SELECT data FROM model_chunks WHERE height = 1 AND seq = 0")).one()
        data = bytearray(row.data)
        data[-1] ^= 0x01                                    # one flipped bit in the last weight byte
        conn.execute(text("UPDATE model_chunks SET data = :d WHERE height = 1 AND seq = 0"), {"d": bytes(data)})
    sn = start_sn(data_dir)
    try:
        verify = run_console(sn.port, "verify()", tmp_path)
        download = run_console(sn.port, "getModel(height=1, path='bad.pt')", tmp_path)
    finally:
        stop_sn(sn)

    assert verify.returncode == 1 and verify.stdout.startswith("FAIL: ")
    assert download.returncode == 1 and len(download.stdout.strip().splitlines()) == 1
    assert "Traceback" not in download.stderr
    assert not (tmp_path / "bad.pt").exists()


class LyingSuperNode(fledger_pb2_grpc.SuperNodeServicer):
    """Serves other weights than the chain records, in a chunk stream that is consistent in itself."""

    def GetModel(self, request, context):
        yield from transport.send_weights(weights_for(100))


class BlockAdmin(fledger_pb2_grpc.AdminServicer):
    """Only GetBlock, straight from a real ledger."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def GetBlock(self, request, context):
        block, records = self.ledger.get_block(request.height)
        return BlockViewMsg(block=serde.block_to_msg(block), records=[serde.record_to_msg(r) for r in records],
                            hash=block.hash)


def test_model_that_does_not_match_the_chain_is_refused_and_not_saved(tmp_path) -> None:
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

    def expect(self, needle: str, timeout: float = 20.0) -> str:
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


def test_pty_session_survives_a_bogus_line_and_quits_with_0(network, tmp_path) -> None:
    sn, _edge, _hashes = network
    term = Terminal(sn.port, tmp_path)
    try:
        term.expect("fledger> ")
        term.type("status()")
        assert "head      height 2" in term.expect("fledger> ")
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


# ---------------------------------------------------------------- Train/Pause/Save/Eval (client side)

class ScriptedAdmin(fledger_pb2_grpc.AdminServicer):
    """Stand-in for the SN's Train/Pause/Save/Eval until AdminServicer implements them (it answers UNIMPLEMENTED)."""

    def Train(self, request, context):
        for round_ in range(1, request.rounds + 1):
            yield TrainProgressMsg(round=round_, height=round_, block_hash="ab" * 32, participants=2,
                                   metrics={"accuracy": 0.5 + round_ / 10, "loss": 1.0 / round_, "seconds": 1.5})

    def Pause(self, request, context):
        return EmptyMsg()

    def Save(self, request, context):
        return SaveReplyMsg(path=request.path or "/srv/model.pt", model_hash="cd" * 32)

    def Eval(self, request, context):
        edges = [EdgeEvalMsg(node_id="e1", loss=0.3, accuracy=0.7, samples=50),
                 EdgeEvalMsg(node_id="e2", loss=0.2, accuracy=0.9, samples=60)]
        return EvalReplyMsg(loss=0.25, accuracy=0.875, samples=400, edges=edges, edge_accuracy_mean=0.8,
                            edge_accuracy_min=0.7, edge_accuracy_max=0.9)


def test_train_pause_save_eval_print_the_replies() -> None:
    server, port = transport.create_server("127.0.0.1:0", max_workers=4)
    fledger_pb2_grpc.add_AdminServicer_to_server(ScriptedAdmin(), server)
    server.start()
    out = io.StringIO()
    try:
        with Console(f"127.0.0.1:{port}", out=out) as console:
            code = console.run_script("trainFL(rounds=2); pause(); save(path='/tmp/x.pt'); eval()")
    finally:
        server.stop(None).wait()

    lines = out.getvalue().splitlines()
    assert code == 0, out.getvalue()
    assert lines[0].startswith("training for 2 round(s)")
    assert lines[1].split() == ["round", "1", "accuracy", "0.6000", "loss", "1.0000", "1.5s", "block", "1",
                                "abababababab", "participants", "2", "failures", "0"]
    assert lines[2].startswith("round    2  accuracy 0.7000  loss 0.5000")
    assert lines[3] == "training finished"
    assert lines[4] == "training will stop after the current round"
    assert lines[5] == f"saved on 127.0.0.1:{port}: /tmp/x.pt (model hash {'cd' * 32})"
    assert lines[6] == "global model: accuracy 0.8750  loss 0.2500  on 400 samples"
    assert lines[8].split() == ["e1", "0.7000", "0.3000", "50"]
    assert lines[10] == "personalised accuracy: mean 0.8000  min 0.7000  max 0.9000"
