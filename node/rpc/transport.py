"""Servers, channels, error mapping and chunked weight transfer shared by every node."""
from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chain.encoding import is_hex_digest
from chain.tensors import decode_weights, encode_weights, model_hash
from node.engine import errors
from node.engine.errors import clip
from node.ledger import store_failure
from node.rpc.options import (
    CHUNK_SIZE,
    MAX_CALLS_PER_PEER,
    MAX_CONCURRENT_RPCS,
    MAX_MODEL_BYTES,
    MAX_WORKERS,
    STREAM_IDLE_S,
    channel_options,
    server_options,
)
from node.security.pki import TlsCredentials
from proto import fledger_pb2
from proto.fledger_pb2 import WeightsChunk as WeightsChunkMsg

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["clip"]   # re-exported: the wire layer's callers clip peer-chosen text with transport.clip

LOG_TEXT_LIMIT = 200    # characters of a refusal's message in the node's log (peers choose much of it)
DETAILS_LIMIT = 1000    # characters of a status message sent back (gRPC's metadata limit is 16 KiB)
INTERNAL_DETAILS = "internal error (see the node's log)"


class StreamIdleError(errors.NetError):
    """A client stream sent no message for the server's idle limit, so the server cancelled the call."""


# Domain error -> status code. Anything else escaping a servicer is a bug: logged with its traceback once and
# answered INTERNAL (see ``guarded``).
STATUS_FOR: dict[type[Exception], grpc.StatusCode] = {
    errors.CancelledError: grpc.StatusCode.CANCELLED,
    StreamIdleError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.BadRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.TakenIdError: grpc.StatusCode.ALREADY_EXISTS,
    errors.NoCapacityError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.NoMajorityError: grpc.StatusCode.ABORTED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.ForbiddenError: grpc.StatusCode.PERMISSION_DENIED,
}


def create_server(address: str, max_workers: int = MAX_WORKERS, services: Iterable[str] = (),
                  security: TlsCredentials | None = None) -> tuple[grpc.Server, int]:
    """A server bound to ``address`` ("host:0" picks a free port) serving grpc.health.v1 for "" and
    ``services`` (full names, e.g. "fledger.v1.EdgeNode"); returns (server, bound port). With ``security`` the
    port speaks mutual TLS only (secure mode); without, plaintext (open mode). Add servicers, then start."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=server_options(),
                         maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS)
    if security is not None:
        from node.rpc.security import server_credentials
        port = server.add_secure_port(address, server_credentials(security))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}; is the port in use?")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ("", *services)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _HEALTH[server] = (health_servicer, names)
    return server, port


# Each server's health servicer and the service names it reports, for ``set_serving``.
_HEALTH: weakref.WeakKeyDictionary[grpc.Server, tuple[Any, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def set_serving(server: grpc.Server, serving: bool) -> None:
    """Report every service of ``server`` as SERVING or NOT_SERVING on its grpc.health.v1 service (a super node
    whose ledger cannot write is NOT_SERVING until it heals)."""
    entry = _HEALTH.get(server)
    if entry is None:
        return
    servicer, names = entry
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in names:
        servicer.set(name, status)


def open_channel(address: str, security: TlsCredentials | None = None) -> grpc.Channel:
    """A channel to ``address``: mutual TLS with ``security`` (this node's certificate), plaintext without."""
    if security is None:
        return grpc.insecure_channel(address, options=channel_options())
    from node.rpc.security import CHANNEL_OPTIONS, channel_credentials
    return grpc.secure_channel(address, channel_credentials(security), options=channel_options() + CHANNEL_OPTIONS)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code a domain error stands for (None: not a domain error)."""
    return next((code for kind, code in STATUS_FOR.items() if isinstance(exc, kind)), None)


def abort_for(context: grpc.ServicerContext, exc: Exception) -> None:
    """Abort the call with the status code mapped from a domain error, its message clipped (re-raise anything
    else)."""
    code = status_for(exc)
    if code is None:
        raise exc
    context.abort(code, clip(exc, DETAILS_LIMIT))


def _is_abort(exc: BaseException) -> bool:
    # grpc's ServicerContext.abort records the status, then raises a bare Exception() to unwind the handler.
    return type(exc) is Exception and not exc.args


def answer_error(context: grpc.ServicerContext, method: str, exc: Exception) -> NoReturn:
    """End a call whose handler raised ``exc``: a domain error becomes its status code with one short log line (as
    does a method left unimplemented: UNIMPLEMENTED); a request stream broken by the client leaving ends the call
    quietly; anything else is a bug, logged once with its traceback and answered INTERNAL. An abort already under
    way goes on."""
    if _is_abort(exc):
        raise exc
    if status_for(exc) is not None:
        log.info("%s refused: %s", method, clip(exc, LOG_TEXT_LIMIT))
        abort_for(context, exc)
    failure = store_failure(exc)
    if failure is not None:   # this node's store (or disk) failed under the call: it may work again soon
        log.warning("%s failed: this node's ledger store is unavailable: %s", method, failure)
        context.abort(grpc.StatusCode.UNAVAILABLE, clip(f"this node's ledger store is unavailable: {failure}",
                                                        LOG_TEXT_LIMIT))
    if isinstance(exc, NotImplementedError):   # a method the servicer leaves to its generated base class
        log.info("%s refused: not implemented here", method)
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this node")
    if isinstance(exc, grpc.RpcError) and not context.is_active():
        log.debug("%s: the caller went away", method)
        context.abort(grpc.StatusCode.CANCELLED, "the caller went away")   # nobody hears it; grpc logs nothing
    log.exception("%s failed (a bug; the caller got INTERNAL)", method)
    context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)
    raise AssertionError("unreachable: context.abort raises")


def guarded(fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for servicer methods: domain errors become status codes with their (clipped) message, anything
    else INTERNAL (see ``answer_error``)."""
    def wrapper(self, request, context):
        try:
            return fn(self, request, context)
        except Exception as exc:
            answer_error(context, fn.__name__, exc)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def guarded_stream(fn: Callable[..., Iterator[T]]) -> Callable[..., Iterator[T]]:
    """Like ``guarded`` for server-streaming methods (generators)."""
    def wrapper(self, request, context):
        try:
            yield from fn(self, request, context)
        except Exception as exc:
            answer_error(context, fn.__name__, exc)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


# ---------------------------------------------------------------- serving a service of proto/fledger.proto

Authorize = Callable[[str, Any], None]   # (method's full name "/fledger.v1.X/Y", context); may abort the call


class PeerLimiter:
    """Calls in flight per peer on one server: a peer at its limit is refused until one of its calls ends."""

    def __init__(self, limit: int = MAX_CALLS_PER_PEER):
        self.limit = limit
        self._lock = threading.Lock()
        self._calls: dict[str, int] = {}

    def acquire(self, peer: str) -> bool:
        with self._lock:
            count = self._calls.get(peer, 0)
            if count >= self.limit:
                return False
            self._calls[peer] = count + 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            count = self._calls.get(peer, 0) - 1
            if count > 0:
                self._calls[peer] = count
            else:
                self._calls.pop(peer, None)


_LIMITERS: weakref.WeakKeyDictionary[Any, PeerLimiter] = weakref.WeakKeyDictionary()
_LIMITERS_LOCK = threading.Lock()


def _limiter_for(server: Any, limit: int) -> PeerLimiter:
    """The one limiter of ``server``, shared by all its services (the first ``add_service`` sets its limit)."""
    with _LIMITERS_LOCK:
        if server not in _LIMITERS:
            _LIMITERS[server] = PeerLimiter(limit)
        return _LIMITERS[server]


def peer_key(context: Any) -> str:
    """Who a call is from, for per-peer limits: the TLS certificate it presented, else its IP address (every
    connection from one address counts as one peer; the port differs per connection)."""
    certificates = context.auth_context().get("x509_pem_cert")
    if certificates:
        return "tls:" + hashlib.sha256(certificates[0]).hexdigest()
    peer = unquote(context.peer())   # "ipv4:10.0.0.7:50312", "ipv6:[::1]:50312" (maybe %-escaped), "unix:..."
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return rest.rpartition(":")[0].strip("[]")
    return peer


class _Watchdog:
    """One thread for all client streams: runs an armed action once its time passes, unless disarmed first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._due: dict[int, tuple[float, Callable[[], None]]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float, action: Callable[[], None]) -> int:
        with self._cond:
            token = next(self._ids)
            self._due[token] = (time.monotonic() + seconds, action)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="stream-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._due.pop(token, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                actions = [self._due.pop(t)[1] for t, (due, _) in list(self._due.items()) if due <= now]
                if not actions:
                    earliest = min((due for due, _ in self._due.values()), default=now + 60.0)
                    self._cond.wait(earliest - now)
                    continue
            for action in actions:
                try:
                    action()
                except Exception:
                    log.exception("stream watchdog: cancelling an idle stream failed")


_WATCHDOG = _Watchdog()


def _cancel_with_status(context: Any, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread (``context.abort`` works only in the handler's own thread). Cancelling the
    call also wakes its handler, blocked on the next request, so the worker thread is freed. The public
    ``context.cancel()`` tells the client only CANCELLED, so the core call (a private attribute of grpc's server
    context) is cancelled with the status where it can be reached."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]
    except Exception:
        context.cancel()


class _Requests:
    """A client stream's raw messages, each parsed as it arrives; waiting more than ``idle_s`` seconds for the next
    one cancels the call with DEADLINE_EXCEEDED, and the servicer sees StreamIdleError."""

    def __init__(self, raw: Iterator[bytes], parse: Callable[[bytes], Any], idle_s: float, context: Any):
        self._raw, self._parse, self._idle_s, self._context = raw, parse, idle_s, context
        self._expired = False

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        token = _WATCHDOG.arm(self._idle_s, self._expire)
        try:
            raw = next(self._raw)
        except grpc.RpcError:
            if self._expired:
                raise StreamIdleError(f"no message for {self._idle_s:g} s") from None
            raise
        finally:
            _WATCHDOG.disarm(token)
        return self._parse(raw)

    def _expire(self) -> None:
        self._expired = True
        _cancel_with_status(self._context, grpc.StatusCode.DEADLINE_EXCEEDED, f"no message for {self._idle_s:g} s")


def add_service(server: grpc.Server, service_name: str, servicer: Any, *, authorize: Authorize | None = None,
                idle_s: float = STREAM_IDLE_S, max_calls_per_peer: int = MAX_CALLS_PER_PEER) -> None:
    """Serve ``servicer`` for a service of proto/fledger.proto ("EdgeNode" or "fledger.v1.EdgeNode").

    Requests arrive as bytes and are parsed here, so garbage is INVALID_ARGUMENT "malformed <Message> request"
    with one short log line (gRPC's own parsing answers INTERNAL and logs a traceback per bad request). Per call,
    in order: at most ``max_calls_per_peer`` calls in flight per peer on this server (``peer_key``; more are
    RESOURCE_EXHAUSTED), then ``authorize(method_full_name, context)`` when given (it may abort the call), then
    the servicer's method. A client stream silent for ``idle_s`` seconds is cancelled with DEADLINE_EXCEEDED.
    Errors escaping the method are answered as ``guarded`` does."""
    service = fledger_pb2.DESCRIPTOR.services_by_name.get(service_name.rpartition(".")[2])
    if service is None or service_name not in (service.name, service.full_name):
        raise ValueError(f"no service {service_name!r} in proto/fledger.proto")
    limiter = _limiter_for(server, max_calls_per_peer)
    handlers = {method.name: _method_handler(method, getattr(servicer, method.name), limiter, authorize, idle_s)
                for method in service.methods if hasattr(servicer, method.name)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _method_handler(method: Any, behavior: Callable[..., Any], limiter: PeerLimiter, authorize: Authorize | None,
                    idle_s: float) -> grpc.RpcMethodHandler:
    request_type = getattr(fledger_pb2, method.input_type.name)
    response_type = getattr(fledger_pb2, method.output_type.name)
    full_name = f"/{method.containing_service.full_name}/{method.name}"
    name = method.name

    def parse(raw: bytes) -> Any:
        request = request_type()
        try:
            request.ParseFromString(raw)
        except Exception:   # DecodeError, or whatever else the protobuf backend raises on garbage
            raise errors.BadRequestError(f"malformed {request_type.__name__} request") from None
        return request

    @contextmanager
    def admitted(context: Any) -> Iterator[None]:
        peer = peer_key(context)
        if not limiter.acquire(peer):
            log.debug("%s refused: too many concurrent calls from %s", name, clip(peer, 80))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent calls from this peer")
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):   # the call's end and its termination callback both come here
                limiter.release(peer)

        context.add_callback(release)
        try:
            if authorize is not None:
                authorize(full_name, context)
            yield
        finally:
            release()

    def unary(raw: bytes, context: Any) -> Any:
        try:
            with admitted(context):
                return behavior(parse(raw), context)
        except Exception as exc:
            answer_error(context, name, exc)

    def stream_in(raw: Iterator[bytes], context: Any) -> Any:
        try:
            with admitted(context):
                return behavior(_Requests(raw, parse, idle_s, context), context)
        except Exception as exc:
            answer_error(context, name, exc)

    def stream_out(raw: bytes, context: Any) -> Iterator[Any]:
        try:
            with admitted(context):
                yield from behavior(parse(raw), context)
        except Exception as exc:
            answer_error(context, name, exc)

    def stream_both(raw: Iterator[bytes], context: Any) -> Iterator[Any]:
        try:
            with admitted(context):
                yield from behavior(_Requests(raw, parse, idle_s, context), context)
        except Exception as exc:
            answer_error(context, name, exc)

    serialize = response_type.SerializeToString
    if method.client_streaming and method.server_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_both, response_serializer=serialize)
    if method.client_streaming:
        return grpc.stream_unary_rpc_method_handler(stream_in, response_serializer=serialize)
    if method.server_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_out, response_serializer=serialize)
    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize)


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
            if not is_hex_digest(chunk.model_hash):
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
        except (ValueError, OverflowError, RecursionError) as exc:   # TensorFormatError is a ValueError
            raise errors.BadRequestError(f"weights blob is malformed: {clip(exc)}") from exc
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


def probe_health(address: str, timeout: float = 3.0, security: TlsCredentials | None = None) -> bool:
    """The node's standard gRPC health service answers SERVING within ``timeout`` seconds."""
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def speaks_tls(address: str, timeout: float = 3.0) -> bool:
    """Whether ``address`` answers a TLS handshake (a secure node) rather than plaintext HTTP/2: what a client
    without credentials checks to tell "secure node, bring an identity" from "node down"."""
    import socket
    import ssl

    host, _, port = address.rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock, \
                context.wrap_socket(sock) as tls:
            tls.do_handshake()
    except ssl.SSLError as exc:   # a TLS alert ("certificate required") is TLS; a wrong record version is not
        return "ALERT" in str(exc.reason or "").upper()
    except (OSError, ValueError):
        return False
    return True
