"""Chunked weight transfer over a real loopback gRPC server: big models, malformed streams, health."""
from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chain.tensors import encode_weights, model_hash
from node.rpc import transport
from node.rpc.options import CHUNK_SIZE, MAX_MESSAGE_BYTES
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import EvalReply as EvalReplyMsg
from proto.fledger_pb2 import FitReply as FitReplyMsg
from proto.fledger_pb2 import FitRequest as FitRequestMsg
from proto.fledger_pb2 import FitSummary as FitSummaryMsg
from proto.fledger_pb2 import WeightsChunk as WeightsChunkMsg


class EchoEdge(fledger_pb2_grpc.EdgeNodeServicer):
    """Fit echoes the received weights back; Evaluate reports the size of the received blob as 'samples'."""

    @transport.guarded_stream
    def Fit(self, request_iterator, context) -> Iterator[FitReplyMsg]:
        weights, _ = transport.receive_weights(r.weights for r in request_iterator)
        yield FitReplyMsg(summary=FitSummaryMsg(samples=len(weights)))
        for chunk in transport.send_weights(weights):
            yield FitReplyMsg(weights=chunk)

    @transport.guarded
    def Evaluate(self, request_iterator, context) -> EvalReplyMsg:
        weights, _ = transport.receive_weights(request_iterator)
        return EvalReplyMsg(samples=len(encode_weights(weights)))


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    server, port = transport.create_server("127.0.0.1:0", max_workers=4, services=["fledger.v1.EdgeNode"])
    fledger_pb2_grpc.add_EdgeNodeServicer_to_server(EchoEdge(), server)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[fledger_pb2_grpc.EdgeNodeStub]:
    with transport.open_channel(address) as channel:
        yield fledger_pb2_grpc.EdgeNodeStub(channel)


def small_weights() -> dict[str, np.ndarray]:
    return {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(3, dtype=np.float64)}


def test_chunks_stay_under_the_message_limit_and_carry_hash_only_first() -> None:
    weights = {"w": np.zeros(3 * CHUNK_SIZE // 4 + 5, dtype=np.float32)}

    chunks = list(transport.send_weights(weights))

    assert len(chunks) == 4
    assert all(len(c.data) <= CHUNK_SIZE < MAX_MESSAGE_BYTES for c in chunks)
    assert chunks[0].model_hash == model_hash(weights) and chunks[0].total_size == len(encode_weights(weights))
    assert not any(c.model_hash or c.total_size for c in chunks[1:])


def test_receive_weights_round_trips_locally() -> None:
    weights = small_weights()

    got, _ = transport.receive_weights(transport.send_weights(weights, chunk_size=7))

    assert sorted(got) == sorted(weights)
    assert all(got[k].dtype == weights[k].dtype and got[k].tobytes() == weights[k].tobytes() for k in weights)


def test_receive_weights_returns_the_model_hash() -> None:
    weights = small_weights()

    _, digest = transport.receive_weights(transport.send_weights(weights, chunk_size=7))

    assert digest == model_hash(weights)


def assembled(chunks: Iterable[WeightsChunkMsg]) -> transport.WeightsAssembler:
    assembler = transport.WeightsAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler


def test_finish_blob_returns_the_sent_bytes() -> None:
    assembler = assembled(transport.send_weights(small_weights(), chunk_size=7))

    assert assembler.finish_blob() == encode_weights(small_weights())


def test_finish_blob_checks_the_size_only() -> None:
    blob = b"not a weight blob at all"
    assembler = assembled(transport.blob_chunks(blob, "ab" * 32, chunk_size=5))

    assert assembler.finish_blob() == blob


def test_finish_blob_of_a_short_transfer_is_bad_request() -> None:
    chunks = list(transport.send_weights(small_weights(), chunk_size=16))
    assembler = assembled(chunks[:-1])

    with pytest.raises(transport.errors.BadRequestError, match="announced bytes"):
        assembler.finish_blob()


def test_finish_blob_without_any_chunk_is_bad_request() -> None:
    with pytest.raises(transport.errors.BadRequestError, match="no weights were sent"):
        transport.WeightsAssembler().finish_blob()


def test_finish_with_a_hash_mismatch_is_bad_request() -> None:
    assembler = assembled(transport.blob_chunks(encode_weights(small_weights()), "ab" * 32))

    with pytest.raises(transport.errors.BadRequestError, match="hash mismatch"):
        assembler.finish()


def test_100mb_model_streams_both_ways_with_the_same_hash(stub) -> None:
    rng = np.random.default_rng(0)
    weights = {"big": rng.standard_normal(25 * 1024 * 1024, dtype=np.float32), "small": np.arange(5)}
    expected = model_hash(weights)

    replies = stub.Fit((FitRequestMsg(weights=c) for c in transport.send_weights(weights)), timeout=120)
    summary = next(replies)
    got, _ = transport.receive_weights(r.weights for r in replies)

    assert summary.summary.samples == 2
    assert model_hash(got) == expected


def _call_evaluate(stub, chunks: list[WeightsChunkMsg]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(iter(chunks), timeout=10)
    return info.value


def test_short_stream_is_invalid_argument(stub) -> None:
    chunks = list(transport.send_weights(small_weights(), chunk_size=16))

    err = _call_evaluate(stub, chunks[:-1])

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "announced bytes" in err.details()


def test_overlong_stream_is_invalid_argument(stub) -> None:
    chunks = list(transport.send_weights(small_weights(), chunk_size=16))

    err = _call_evaluate(stub, chunks + [WeightsChunkMsg(data=b"extra")])

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceed" in err.details()


def test_hash_mismatch_is_invalid_argument(stub) -> None:
    blob = encode_weights(small_weights())

    err = _call_evaluate(stub, list(transport.blob_chunks(blob, "ab" * 32)))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "hash mismatch" in err.details()


def test_garbage_blob_is_invalid_argument(stub) -> None:
    err = _call_evaluate(stub, list(transport.blob_chunks(b"not a weight blob at all", "ab" * 32)))

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()


def test_missing_header_is_invalid_argument(stub) -> None:
    err = _call_evaluate(stub, [WeightsChunkMsg(data=b"abc")])

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "first weights chunk" in err.details()


def test_announced_size_over_limit_is_refused_before_buffering() -> None:
    assembler = transport.WeightsAssembler(max_bytes=100)

    with pytest.raises(transport.errors.BadRequestError, match="exceeds the limit"):
        assembler.add(WeightsChunkMsg(model_hash="ab" * 32, total_size=101, data=b""))


def test_server_keeps_serving_after_bad_streams(stub) -> None:
    _call_evaluate(stub, [WeightsChunkMsg(data=b"abc")])

    reply = stub.Evaluate(transport.send_weights(small_weights()), timeout=10)

    assert reply.samples == len(encode_weights(small_weights()))


def test_health_service_reports_serving(address: str) -> None:
    with transport.open_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        edge = health.Check(health_pb2.HealthCheckRequest(service="fledger.v1.EdgeNode"), timeout=5)

    assert overall.status == edge.status == health_pb2.HealthCheckResponse.SERVING


def test_probe_health_of_a_serving_node_is_true(address: str) -> None:
    assert transport.probe_health(address, timeout=5) is True


def test_probe_health_of_a_closed_port_is_false() -> None:
    with socket.socket() as sock:   # a port that was free a moment ago, with nothing listening on it now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    assert transport.probe_health(f"127.0.0.1:{port}", timeout=1) is False


def test_probe_health_of_a_node_not_serving_is_false() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    status = health.HealthServicer()
    status.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(status, server)
    server.start()
    try:
        serving = transport.probe_health(f"127.0.0.1:{port}", timeout=5)
    finally:
        server.stop(None)

    assert serving is False
