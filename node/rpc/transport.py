"""Servers, channels, error mapping and chunked weight transfer shared by every node."""
from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from typing import TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chain.encoding import EncodingError
from chain.tensors import decode_weights, encode_weights, model_hash
from node.engine import errors
from node.rpc.options import CHUNK_SIZE, MAX_MODEL_BYTES, channel_options, server_options
from proto.fledger_pb2 import WeightsChunk as WeightsChunkMsg

log = logging.getLogger(__name__)

T = TypeVar("T")

# Domain error -> status code. Anything not listed is a bug and surfaces as UNKNOWN with a traceback.
STATUS_FOR: dict[type[Exception], grpc.StatusCode] = {
    errors.BadRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.TakenIdError: grpc.StatusCode.ALREADY_EXISTS,
    errors.NoCapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NoMajorityError: grpc.StatusCode.ABORTED,
}


def create_server(address: str, max_workers: int = 16, services: Iterable[str] = ()) -> tuple[grpc.Server, int]:
    """A server bound to ``address`` ("host:0" picks a free port) serving grpc.health.v1 for "" and
    ``services`` (full names, e.g. "fledger.v1.EdgeNode"); returns (server, bound port). Add servicers, then start."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=server_options())
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}; is the port in use?")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *services):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=channel_options())


def abort_for(context: grpc.ServicerContext, exc: Exception) -> None:
    """Abort the call with the status code mapped from a domain error (re-raise anything else)."""
    for kind, code in STATUS_FOR.items():
        if isinstance(exc, kind):
            context.abort(code, str(exc))
    raise exc


def guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for servicer methods: domain errors become status codes with their message."""
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except errors.NetError as exc:
            log.info("%s refused: %s", fn.__name__, exc)
            abort_for(context, exc)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def guarded_stream(fn: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """Like ``guarded`` for server-streaming methods (generators)."""
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except errors.NetError as exc:
            log.info("%s refused: %s", fn.__name__, exc)
            abort_for(context, exc)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# ---------------------------------------------------------------- chunked weights

def blob_chunks(blob: bytes, digest: str, chunk_size: int = CHUNK_SIZE) -> Iterator[WeightsChunkMsg]:
    """Chunk messages for an encoded blob whose decoded model hash is ``digest``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = memoryview(blob)
    yield WeightsChunkMsg(model_hash=digest, total_size=len(blob), data=bytes(view[:chunk_size]))
    for start in range(chunk_size, len(blob), chunk_size):
        yield WeightsChunkMsg(data=bytes(view[start: start + chunk_size]))


def send_weights(weights: Mapping[str, np.ndarray], chunk_size: int = CHUNK_SIZE) -> Iterator[WeightsChunkMsg]:
    """Encode weights (no pickle) and yield them as chunk messages, hash and size in the first. Where the blob
    and hash are already known (a round's base, a stored block), use ``blob_chunks`` instead."""
    return blob_chunks(encode_weights(dict(weights)), model_hash(dict(weights)), chunk_size)


class WeightsAssembler:
    """Collects chunk messages of one transfer and checks size, hash and format at the end."""

    def __init__(self, max_bytes: int = MAX_MODEL_BYTES):
        self.max_bytes = max_bytes
        self.expected_hash: str | None = None
        self.total: int | None = None
        self._buf = bytearray()

    @property
    def started(self) -> bool:
        return self.total is not None

    def add(self, chunk: WeightsChunkMsg) -> None:
        if self.total is None:
            if not chunk.model_hash or len(chunk.model_hash) != 64:
                raise errors.BadRequestError("first weights chunk must carry the 64-hex-digit model_hash")
            if chunk.total_size > self.max_bytes:
                raise errors.BadRequestError(
                    f"model of {chunk.total_size} bytes exceeds the limit of {self.max_bytes} bytes")
            self.expected_hash, self.total = chunk.model_hash, chunk.total_size
        elif chunk.model_hash or chunk.total_size:
            raise errors.BadRequestError("only the first weights chunk may carry model_hash/total_size")
        if len(self._buf) + len(chunk.data) > self.total:
            raise errors.BadRequestError(
                f"weights chunks exceed the announced total_size of {self.total} bytes")
        self._buf += chunk.data

    def finish_blob(self) -> bytes:
        """The whole blob after checking its size only: for a receiver that verifies the model itself (a block's
        model is checked once, by the ledger, against the block's header)."""
        if self.total is None:
            raise errors.BadRequestError("no weights were sent")
        if len(self._buf) != self.total:
            raise errors.BadRequestError(
                f"weights transfer ended after {len(self._buf)} of {self.total} announced bytes")
        blob = bytes(self._buf)
        self._buf = bytearray()
        return blob

    def finish(self) -> tuple[dict[str, np.ndarray], str]:
        """Return (weights, model hash) after checking completeness, format and the announced model hash; the
        weights are decoded and hashed once."""
        blob = self.finish_blob()
        try:
            weights = decode_weights(blob)
        except EncodingError as exc:
            raise errors.BadRequestError(f"weights blob is malformed: {exc}") from exc
        actual = model_hash(weights)
        if not hmac.compare_digest(actual, str(self.expected_hash)):
            raise errors.BadRequestError(
                f"model hash mismatch: announced {self.expected_hash}, received weights hash to {actual}")
        return weights, actual


def receive_weights(chunks: Iterable[WeightsChunkMsg],
                    max_bytes: int = MAX_MODEL_BYTES) -> tuple[dict[str, np.ndarray], str]:
    """Reassemble a whole stream of chunk messages into (weights, model hash); BadRequestError naming what is wrong."""
    assembler = WeightsAssembler(max_bytes)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


def rpc_error_text(exc: grpc.RpcError) -> str:
    """One line for logs and user messages: the status code and the peer's message."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return f"{code.name if code else 'UNKNOWN'}: {details}"


def probe_health(address: str, timeout: float = 3.0) -> bool:
    """The node's standard gRPC health service answers SERVING within ``timeout`` seconds."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
