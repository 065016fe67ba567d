"""An edge node served on loopback, driven through GrpcParticipant: signed receipts, bad input, the run_round seam."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from chain.keys import NodeKey
from chain.tensors import model_hash
from fl.aggregate import Accumulator
from fl.data import Dataset
from fl.local import InProcessParticipant, Workbench
from fl.models import build_model
from fl.participant import FitIns
from fl.server import run_round
from node.engine.edge import EdgeCore, LocalEdges
from node.engine.receipts import check_receipt
from node.engine.types import Base, EdgeRef
from node.engine.views import MemberView
from node.process.edge import SERVICE
from node.rpc import transport
from node.rpc.clients import GrpcParticipant, RemoteError
from node.rpc.services import EdgeServicer
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import FitRequest as FitRequestMsg

INS = FitIns(round=1, epochs=1, batch_size=16, lr=0.05, momentum=0.0, seed=3)


def tiny_dataset() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (96,), generator=g)
    return Dataset("mnist", x, y, x[:8], y[:8], 10, (1, 28, 28), "synthetic")


DATA = tiny_dataset()


def participant(pid: str, index: int) -> InProcessParticipant:
    torch.manual_seed(0)
    model = build_model("2nn")
    idx = np.arange(index * 48, index * 48 + 48)
    return InProcessParticipant(pid, DATA, idx[:40], idx[40:], Workbench(model), list(model.state_dict()))


def initial_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.numpy().copy() for k, v in build_model("2nn").state_dict().items()}


@pytest.fixture(scope="module")
def edges() -> Iterator[list[tuple[NodeKey, str]]]:
    out, servers = [], []
    for i in range(2):
        key = NodeKey.from_seed(f"edge-{i}".encode())
        server, port = transport.create_server("127.0.0.1:0", max_workers=4, services=[SERVICE])
        address = f"127.0.0.1:{port}"
        info = MemberView(key.node_id, key.public_hex, address, "edge", True, samples=40, share=i)
        fledger_pb2_grpc.add_EdgeNodeServicer_to_server(
            EdgeServicer(EdgeCore(participant(key.node_id, i), key, share=i), info), server)
        server.start()
        servers.append(server)
        out.append((key, address))
    yield out
    for server in servers:
        server.stop(None)


def base() -> Base:
    return Base(0, None, initial_weights())


def test_fit_returns_weights_with_a_checked_signed_receipt(edges) -> None:
    key, address = edges[0]
    weights = initial_weights()
    proxy = GrpcParticipant(key.node_id, address, Base(0, None, weights))

    res = proxy.fit(weights, INS)
    rec = res.receipt.check()

    assert res.samples == 40 and set(res.weights) == set(weights)
    assert rec.trainer_id == key.node_id and rec.round == 1
    assert rec.base_model_hash == model_hash(weights) and rec.update_hash == model_hash(res.weights)
    assert set(rec.metrics) == {"accuracy_bp", "loss_micro"}
    proxy.close()


def test_receipt_from_another_node_is_rejected(edges) -> None:
    _, address = edges[0]
    impostor_id = NodeKey.from_seed(b"someone-else").node_id
    weights = base()

    res = GrpcParticipant(impostor_id, address, weights).fit(weights.weights, INS)

    with pytest.raises(ValueError, match="signed by"):
        check_receipt(res, 1, weights.model_hash, impostor_id)


def test_run_round_over_grpc_equals_run_round_with_in_process_edges(edges) -> None:
    model = base()
    remote = [GrpcParticipant(key.node_id, address, model) for key, address in edges]
    cores = [EdgeCore(participant(key.node_id, i), key, share=i) for i, (key, _) in enumerate(edges)]
    directory = LocalEdges(cores)
    local = [directory.connect(EdgeRef(t.node_id, "", t.share), model) for t in cores]

    over_grpc = run_round(1, remote, model.weights, lambda i, p: INS, Accumulator())
    in_process = run_round(1, local, model.weights, lambda i, p: INS, Accumulator())

    assert model_hash(over_grpc.weights) == model_hash(in_process.weights)
    assert over_grpc.total_samples == in_process.total_samples == 80
    assert [res.receipt for _, res in over_grpc.results] == [res.receipt for _, res in in_process.results]


def test_unreachable_edge_is_a_round_failure_not_an_exception(edges) -> None:
    key, address = edges[0]
    model = base()
    dead = GrpcParticipant(NodeKey.from_seed(b"dead").node_id, "127.0.0.1:1", model)

    outcome = run_round(1, [GrpcParticipant(key.node_id, address, model), dead], model.weights, lambda i, p: INS,
                        Accumulator())

    assert len(outcome.results) == 1 and outcome.failures[0][0] == dead.participant_id
    assert "UNAVAILABLE" in outcome.failures[0][1]


def test_fit_stream_without_fit_ins_is_invalid_argument(edges) -> None:
    _, address = edges[0]
    with transport.open_channel(address) as channel:
        stub = fledger_pb2_grpc.EdgeNodeStub(channel)
        chunks = (FitRequestMsg(weights=c) for c in transport.send_weights(initial_weights()))

        with pytest.raises(grpc.RpcError) as info:
            list(stub.Fit(chunks, timeout=10))

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "FitIns" in info.value.details()


def test_weights_for_another_model_are_invalid_argument(edges) -> None:
    key, address = edges[1]
    other = Base(0, None, {"x": np.zeros(3, dtype=np.float32)})

    with pytest.raises(RemoteError, match="INVALID_ARGUMENT.*cannot evaluate"):
        GrpcParticipant(key.node_id, address, other).evaluate(other.weights)


def test_a_remote_edge_trains_only_from_the_base_it_was_connected_with(edges) -> None:
    key, address = edges[1]

    with pytest.raises(ValueError, match="base model"):
        GrpcParticipant(key.node_id, address, base()).fit({"x": np.zeros(3, dtype=np.float32)}, INS)


def test_evaluate_over_grpc(edges) -> None:
    key, address = edges[1]
    model = base()

    res = GrpcParticipant(key.node_id, address, model).evaluate(model.weights)

    assert res.samples == 8 and 0.0 <= res.accuracy <= 1.0
