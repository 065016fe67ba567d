"""Hostile input against real loopback servers: garbage, deep JSON, huge shapes and sizes, idle streams, too many
calls from one peer, runaway training. Each is refused with a specific status, a short message and at most a short
log line, and the server goes on answering."""
from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from chain.encoding import EncodingError, canonical_bytes, parse_canonical
from chain.keys import NodeKey
from chain.tensors import MAGIC, TensorFormatError, decode_weights, encode_weights, encoded_size, model_hash
from config import Config
from conftest import wait_until
from fl.data import Dataset
from fl.local import InProcessParticipant, Workbench
from fl.models import build_model
from node.engine import membership
from node.engine.edge import EdgeCore
from node.engine.errors import BadRequestError, clip
from node.engine.membership import Membership
from node.engine.types import Partial
from node.engine.views import MemberView
from node.ledger import Ledger
from node.process.supernode import SuperNode
from node.rpc import serde, transport
from node.rpc.options import TRANSFER_SLACK_BYTES
from node.rpc.services import EdgeServicer
from proto import fledger_pb2, fledger_pb2_grpc
from proto.fledger_pb2 import BlockPart as BlockPartMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import FitIns as FitInsMsg
from proto.fledger_pb2 import FitRequest as FitRequestMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg
from proto.fledger_pb2 import ProposalInfo as ProposalInfoMsg
from proto.fledger_pb2 import SignedBlock as SignedBlockMsg
from proto.fledger_pb2 import SignedRecord as SignedRecordMsg
from proto.fledger_pb2 import WeightsChunk as WeightsChunkMsg

GARBAGE = b"\x0a\xff\xff\xff\xff\x0f"   # field 1, length-delimited, announcing far more bytes than follow
DEEP = b"[" * 100_000 + b"]" * 100_000
TEN_MB = "a" * (10 * 1024 * 1024)
GiB = 1024 ** 3


def dataset(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset("mnist", x, y, x[:8], y[:8], 10, (1, 28, 28), "synthetic")


def edge_core(samples: int = 48) -> EdgeCore:
    torch.manual_seed(0)
    model = build_model("2nn")
    idx = np.arange(samples)
    participant = InProcessParticipant("edge", dataset(samples), idx[:-8], idx[-8:], Workbench(model),
                                       list(model.state_dict()))
    return EdgeCore(participant, NodeKey.from_seed(b"bounds-edge"), share=0)


def model_weights() -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return {k: v.numpy().copy() for k, v in build_model("2nn").state_dict().items()}


class Served:
    """A loopback server with one EdgeNode servicer registered through transport.add_service."""

    def __init__(self, servicer: object, max_workers: int = 4, **options: float):
        self.server, port = transport.create_server("127.0.0.1:0", max_workers=max_workers)
        transport.add_service(self.server, "fledger.v1.EdgeNode", servicer, **options)  # type: ignore[arg-type]
        self.server.start()
        self.address = f"127.0.0.1:{port}"
        self.channel = transport.open_channel(self.address)
        self.stub = fledger_pb2_grpc.EdgeNodeStub(self.channel)

    def info_works(self) -> bool:
        return bool(self.stub.Info(EmptyMsg(), timeout=10).node_id)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None)


def edge_servicer(core: EdgeCore) -> EdgeServicer:
    key = core.key
    return EdgeServicer(core, MemberView(key.node_id, key.public_hex, "127.0.0.1:1", "edge", True, samples=40))


@pytest.fixture(scope="module")
def edge() -> Iterator[Served]:
    served = Served(edge_servicer(edge_core()))
    yield served
    served.close()


def make_sn(root: Path, name: str, entry: str | None = None) -> SuperNode:
    ledger = Ledger.open(root / name, key=NodeKey.from_seed(name.encode()))
    sn = SuperNode(ledger, "127.0.0.1:0", Config(data_root=str(root / name)), entry=entry, genesis=False)
    sn.start()
    return sn


@pytest.fixture(scope="module")
def entry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperNode]:
    sn = make_sn(tmp_path_factory.mktemp("bounds"), "entry")
    yield sn
    sn.stop(None)
    sn.ledger.close()


def sn_stub(sn: SuperNode) -> fledger_pb2_grpc.SuperNodeStub:
    return fledger_pb2_grpc.SuperNodeStub(transport.open_channel(sn.address))


def sn_answers(sn: SuperNode) -> bool:
    return sn_stub(sn).GetHead(EmptyMsg(), timeout=10).empty


def refusal(call: object, *args: object, **kwargs: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)  # type: ignore[operator]
        if isinstance(result, Iterator):
            list(result)
    return info.value


def no_traceback(caplog: pytest.LogCaptureFixture) -> bool:
    return not any(r.exc_info or "Traceback" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- strict request parsing


def raw_call(channel: grpc.Channel, service: str, method: object, payload: bytes) -> grpc.RpcError:
    """Send ``payload`` as the request bytes of ``method`` (its only message, or a stream's only message)."""
    path = f"/fledger.v1.{service}/{method.name}"  # type: ignore[attr-defined]
    streaming_in, streaming_out = method.client_streaming, method.server_streaming  # type: ignore[attr-defined]
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}[streaming_in, streaming_out]
    request = iter([payload]) if streaming_in else payload
    return refusal(kind(path), request, timeout=10)


def test_garbage_to_every_edge_method_is_invalid_argument_and_logs_no_traceback(edge, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    methods = fledger_pb2.DESCRIPTOR.services_by_name["EdgeNode"].methods

    errors = {m.name: raw_call(edge.channel, "EdgeNode", m, GARBAGE) for m in methods}

    assert {name: (e.code(), e.details()) for name, e in errors.items()} == {
        "Fit": (grpc.StatusCode.INVALID_ARGUMENT, "malformed FitRequest request"),
        "Evaluate": (grpc.StatusCode.INVALID_ARGUMENT, "malformed WeightsChunk request"),
        "Info": (grpc.StatusCode.INVALID_ARGUMENT, "malformed Empty request")}
    assert no_traceback(caplog) and len(caplog.records) <= len(methods)
    assert edge.info_works()


def test_garbage_to_every_super_node_method_is_invalid_argument_and_logs_no_traceback(entry, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    channel = transport.open_channel(entry.address)
    codes = {}
    for service in ("Registry", "SuperNode", "Admin"):
        for method in fledger_pb2.DESCRIPTOR.services_by_name[service].methods:
            codes[f"{service}.{method.name}"] = raw_call(channel, service, method, GARBAGE).code()

    assert set(codes.values()) == {grpc.StatusCode.INVALID_ARGUMENT}, codes
    assert no_traceback(caplog)
    assert sn_answers(entry)


def test_a_bug_in_a_servicer_is_internal_with_one_logged_traceback(caplog) -> None:
    class Buggy(fledger_pb2_grpc.EdgeNodeServicer):
        @transport.guarded
        def Info(self, request, context):  # noqa: ANN001, ANN202
            raise KeyError("oops")

    served = Served(Buggy())
    caplog.set_level(logging.INFO)
    try:
        err = refusal(served.stub.Info, EmptyMsg(), timeout=10)
    finally:
        served.close()

    assert (err.code(), err.details()) == (grpc.StatusCode.INTERNAL, "internal error (see the node's log)")
    assert [r.exc_info is not None for r in caplog.records] == [True]


def test_a_method_the_servicer_does_not_implement_is_unimplemented_without_a_traceback(caplog) -> None:
    served = Served(fledger_pb2_grpc.EdgeNodeServicer())
    caplog.set_level(logging.INFO)
    try:
        err = refusal(served.stub.Info, EmptyMsg(), timeout=10)
    finally:
        served.close()

    assert err.code() == grpc.StatusCode.UNIMPLEMENTED and no_traceback(caplog)


# ---------------------------------------------------------------- deep JSON, huge shapes


def test_deep_json_is_an_encoding_error() -> None:
    with pytest.raises(EncodingError, match="deeper than 32"):
        parse_canonical(DEEP)


def test_nesting_up_to_the_bound_parses() -> None:
    assert parse_canonical(b"[" * 32 + b"]" * 32) is not None


def test_deep_json_block_is_invalid_argument(entry, caplog) -> None:
    caplog.set_level(logging.INFO)
    parts = [BlockPartMsg(info=ProposalInfoMsg(view=0, sender_id=entry.key.node_id)),
             BlockPartMsg(block=SignedBlockMsg(header_bytes=DEEP, signature=bytes(64)))]

    err = refusal(sn_stub(entry).ProposeBlock, iter(parts), timeout=10)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad block" in err.details()
    assert no_traceback(caplog) and sn_answers(entry)


def test_deep_json_record_is_invalid_argument(entry, caplog) -> None:
    caplog.set_level(logging.INFO)
    parts = [BlockPartMsg(info=ProposalInfoMsg(view=0, sender_id=entry.key.node_id)),
             BlockPartMsg(block=SignedBlockMsg(header_bytes=b"{}", signature=bytes(64))),
             BlockPartMsg(record=SignedRecordMsg(record_bytes=DEEP, signature=bytes(64)))]

    err = refusal(sn_stub(entry).ProposeBlock, iter(parts), timeout=10)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "bad update record" in err.details()
    assert no_traceback(caplog) and sn_answers(entry)


def test_deep_json_record_is_bad_request_for_serde() -> None:
    with pytest.raises(BadRequestError, match="deeper than 32"):
        serde.record_from_msg(SignedRecordMsg(record_bytes=DEEP, signature=bytes(64)))


def blob(header: dict[str, object], data: bytes = b"") -> bytes:
    encoded = canonical_bytes(header)
    return MAGIC + struct.pack(">I", len(encoded)) + encoded + data


def test_deep_json_blob_is_invalid_argument(edge, caplog) -> None:
    caplog.set_level(logging.INFO)
    deep = MAGIC + struct.pack(">I", len(DEEP)) + DEEP

    err = refusal(edge.stub.Evaluate, transport.blob_chunks(deep, "ab" * 32), timeout=10)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()
    assert no_traceback(caplog) and edge.info_works()


@pytest.mark.parametrize("shape, nbytes", [
    ([2**32, 2**32], 0),        # the int64 product wraps to 0
    ([2**62, 3], 2**62 * 12 % 2**64),
    ([2**63], 0),               # past int64
    ([2**64 + 5], 0),
    ([2**62, 0], 0),            # no data, but numpy cannot hold the shape
    ([-1, 4], 0),
])
def test_a_shape_that_overflows_is_a_tensor_format_error(shape: list[int], nbytes: int) -> None:
    header = {"tensors": [{"name": "w", "dtype": "float32", "shape": shape, "offset": 0, "nbytes": nbytes}],
              "total": 0}

    with pytest.raises(TensorFormatError, match="'w'"):
        decode_weights(blob(header))


def test_encoded_size_is_the_length_of_the_blob() -> None:
    weights: dict[str, np.ndarray] = {"w": np.zeros((3, 4), np.float32), "n": np.array(3, np.int64),
                                      "e": np.zeros((0, 2), np.uint8)}

    assert encoded_size(weights) == len(encode_weights(weights))


# ---------------------------------------------------------------- idle streams and per-peer limits


class Silent:
    """A request stream that sends ``first`` messages, then nothing until released."""

    def __init__(self, *first: object):
        self.first, self.release = first, threading.Event()

    def __iter__(self) -> Iterator[object]:
        yield from self.first
        self.release.wait(30)


def test_an_idle_client_stream_is_cancelled_and_frees_its_worker(caplog) -> None:
    caplog.set_level(logging.INFO)
    served = Served(edge_servicer(edge_core()), max_workers=1, idle_s=0.5)
    first = next(transport.send_weights(model_weights(), chunk_size=1024))
    silent = Silent(first)
    try:
        idle = served.stub.Evaluate.future(iter(silent), timeout=20)
        time.sleep(0.1)   # the stream holds the only worker now

        answered = served.info_works()   # waits for the worker; only the idle limit frees it
        err = idle.exception(timeout=10)
    finally:
        silent.release.set()
        served.close()

    assert answered
    assert (err.code(), err.details()) == (grpc.StatusCode.DEADLINE_EXCEEDED, "no message for 0.5 s")
    assert no_traceback(caplog)


def test_calls_over_the_per_peer_limit_are_resource_exhausted_until_one_ends() -> None:
    served = Served(edge_servicer(edge_core()), max_workers=6, max_calls_per_peer=2, idle_s=30)
    streams = [Silent() for _ in range(2)]
    try:
        calls = [served.stub.Evaluate.future(iter(s), timeout=20) for s in streams]
        assert wait_until(lambda: _refused(served) is not None, timeout=10)
        err = _refused(served)
        streams[0].release.set()
        calls[0].exception(timeout=10)

        recovered = served.info_works()
    finally:
        for stream in streams:
            stream.release.set()
        served.close()

    assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.details() == "too many concurrent calls from this peer"
    assert recovered


def _refused(served: Served) -> grpc.RpcError | None:
    try:
        served.stub.Info(EmptyMsg(), timeout=10)
    except grpc.RpcError as exc:
        return exc
    return None


def test_peer_key_is_the_address_without_the_port() -> None:
    class Context:
        def __init__(self, peer: str):
            self._peer = peer

        def auth_context(self) -> dict[str, list[bytes]]:
            return {}

        def peer(self) -> str:
            return self._peer

    assert [transport.peer_key(Context(p)) for p in ("ipv4:10.0.0.7:50312", "ipv6:[::1]:4", "ipv6:%5B::1%5D:4")] \
        == ["10.0.0.7", "::1", "::1"]


# ---------------------------------------------------------------- transfers capped at the model's size


def test_a_declared_2_gib_transfer_is_refused_at_the_first_chunk(edge) -> None:
    silent = Silent(WeightsChunkMsg(model_hash="ab" * 32, total_size=2 * GiB, data=b"x" * 1024))
    try:
        err = edge.stub.Evaluate.future(iter(silent), timeout=20).exception(timeout=10)   # the stream is still open
    finally:
        silent.release.set()
    limit = edge_core().model_bytes + TRANSFER_SLACK_BYTES

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"model of {2 * GiB} bytes exceeds the limit of {limit} bytes"
    assert edge.info_works()


def test_a_partial_bigger_than_its_base_is_refused() -> None:
    weights = {"w": np.zeros(1000, np.float32)}
    parts = serde.partial_parts(Partial(NodeKey.from_seed(b"p").node_id, 1, 5, weights))

    with pytest.raises(BadRequestError, match="exceeds the limit of 100 bytes"):
        serde.read_partial(parts, max_bytes=100)


# ---------------------------------------------------------------- training: bounds and cancellation


def fit_stream(ins: FitInsMsg, weights: dict[str, np.ndarray]) -> Iterator[FitRequestMsg]:
    yield FitRequestMsg(ins=ins)
    for chunk in transport.send_weights(weights):
        yield FitRequestMsg(weights=chunk)


def test_fit_with_a_million_epochs_is_refused(edge) -> None:
    ins = FitInsMsg(round=1, epochs=10**6, batch_size=16, lr=0.05)

    err = refusal(edge.stub.Fit, fit_stream(ins, model_weights()), timeout=10)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "epochs in 1..100" in err.details()
    assert edge.info_works()


@pytest.mark.parametrize("field, value", [("batch_size", 65537), ("lr", 11.0), ("lr", float("nan")),
                                          ("momentum", 1.0), ("momentum", -0.5)])
def test_fit_ins_out_of_bounds_is_bad_request(field: str, value: float) -> None:
    msg = FitInsMsg(round=1, epochs=1, batch_size=16, lr=0.05, momentum=0.0)
    setattr(msg, field, value)

    with pytest.raises(BadRequestError, match="training instructions"):
        serde.fit_ins_from_msg(msg)


def test_a_cancelled_fit_stops_training(caplog) -> None:
    caplog.set_level(logging.INFO)
    core = edge_core(samples=4008)   # 100 epochs of 4,000 single-sample batches: many minutes of training
    served = Served(edge_servicer(core))
    ins = FitInsMsg(round=1, epochs=100, batch_size=1, lr=0.01)
    lock = core.participant.workbench.lock
    try:
        err = refusal(served.stub.Fit, fit_stream(ins, model_weights()), timeout=2)

        stopped = lock.acquire(timeout=20)   # training holds the model until it stops
        if stopped:
            lock.release()
        answered = served.info_works()
    finally:
        served.close()

    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert stopped
    assert any("training cancelled in epoch 1 of 100" in r.getMessage() for r in caplog.records)
    assert no_traceback(caplog)
    assert answered


# ---------------------------------------------------------------- sizes of ids, addresses and counts


def test_a_10_mb_address_is_refused_with_a_short_status(entry, caplog) -> None:
    caplog.set_level(logging.INFO)
    key = NodeKey.from_seed(b"big-address")
    info = NodeInfoMsg(node_id=key.node_id, public_key=key.public_hex, address=TEN_MB, samples=10)

    err = refusal(sn_stub(entry).RegisterEdge, info, timeout=10)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "host:port" in err.details()
    assert len(err.details()) < 400 and all(len(r.getMessage()) < 500 for r in caplog.records)
    assert sn_answers(entry)


def test_a_10_mb_id_is_refused_with_a_short_status(entry, caplog) -> None:
    caplog.set_level(logging.INFO)

    err = refusal(sn_stub(entry).EdgeHeartbeat, HeartbeatRequestMsg(node_id=TEN_MB), timeout=10)

    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "32 lowercase hex digits" in err.details()
    assert len(err.details()) < 400 and all(len(r.getMessage()) < 500 for r in caplog.records)
    assert sn_answers(entry)


def test_a_sample_count_over_2_to_the_40_is_refused() -> None:
    key = NodeKey.from_seed(b"many-samples")

    with pytest.raises(BadRequestError, match="samples is out of range"):
        Membership().register(key.node_id, key.public_hex, "127.0.0.1:5000", samples=2**63)


@pytest.mark.parametrize("address", ["nowhere", "host:", ":5000", "host:0", "host:70000", "a b:1", "h:1\n", "x" * 300])
def test_a_malformed_address_is_refused(address: str) -> None:
    key = NodeKey.from_seed(b"address")

    with pytest.raises(BadRequestError, match="host:port"):
        Membership().register(key.node_id, key.public_hex, address)


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "node-3.example.org:443", "[::1]:80"])
def test_a_host_port_address_is_accepted(address: str) -> None:
    key = NodeKey.from_seed(b"address")

    assert Membership().register(key.node_id, key.public_hex, address).address == address


def test_the_dead_list_keeps_only_the_newest() -> None:
    now = [0.0]
    table = Membership(heartbeat_interval=1.0, missed_beats=1, clock=lambda: now[0])
    keys = [NodeKey.from_seed(f"dead{i}".encode()) for i in range(membership.MAX_DEAD_LISTED + 10)]
    for i, key in enumerate(keys):
        table.register(key.node_id, key.public_hex, f"127.0.0.1:{1000 + i}")
        now[0] += 2.0   # each is dropped before the next registers

    dead = [m.node_id for m, alive, _ in table.listing(include_dead=True) if not alive]

    assert len(dead) == membership.MAX_DEAD_LISTED and keys[0].node_id not in dead and keys[-2].node_id in dead


def test_too_many_metrics_are_refused() -> None:
    with pytest.raises(BadRequestError, match="at most 64 metrics"):
        serde.metrics_from_msg({f"m{i}": 1.0 for i in range(65)})


def test_a_long_metric_name_is_refused() -> None:
    with pytest.raises(BadRequestError, match="at most 64 characters"):
        serde.metrics_from_msg({"m" * 65: 1.0})


def test_a_partial_claiming_2_to_the_63_samples_is_refused() -> None:
    parts = list(serde.partial_parts(Partial(NodeKey.from_seed(b"p").node_id, 1, 0, None)))
    parts[0].header.samples = 2**63

    with pytest.raises(BadRequestError, match="out of range"):
        serde.read_partial(parts)


def test_long_failure_reasons_are_cut() -> None:
    node = NodeKey.from_seed(b"p").node_id
    parts = list(serde.partial_parts(Partial(node, 1, 0, None, failures=[(node, "x" * 100_000)])))

    (_, reason), = serde.read_partial(parts).failures

    assert len(reason) < 600


# ---------------------------------------------------------------- clip


def test_clip_escapes_newlines_and_control_characters() -> None:
    assert clip("a\nb\x00c\u2028") == "a\\nb\\x00c\\u2028"


def test_clip_cuts_long_text_and_says_how_long_it_was() -> None:
    assert clip("x" * 1000, limit=10) == "xxxxxxxxxx...[1000 chars]"


def test_clip_leaves_short_printable_text_alone() -> None:
    assert clip("edge node 12ab: timeout") == "edge node 12ab: timeout"


def test_model_hash_is_unchanged_by_these_bounds() -> None:
    assert model_hash(decode_weights(encode_weights(model_weights()))) == model_hash(model_weights())
