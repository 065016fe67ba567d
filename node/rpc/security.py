"""Secure mode on the wire: mutual-TLS credentials from a node's TlsCredentials, the caller's identity read from its
certificate, and the per-RPC role check every secure server runs before a servicer sees a request.

Identity comes from the peer certificate only (node.security.pki.identity_of): a request field that names a node
is checked against it (``claim``), never trusted on its own. Without TLS (open mode) there is no identity, and every
check here lets the call through, as the original project did.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import grpc

from chain.private import write_private
from node.engine.errors import ForbiddenError
from node.security.pki import TLS_NAME, Identity, PkiError, TlsCredentials, identity_of

log = logging.getLogger(__name__)

Context = Any   # grpc.ServicerContext

NODES = ("entry", "supernode", "edge")          # every admitted node
SUPER = ("entry", "supernode")                  # admitted super nodes, the entry among them

# Who may call what. Super nodes announce rounds and propose and commit blocks (the one leading the view does:
# node.engine.election; a super node that is no validator gets its blocks refused by every validator); only the
# operator calls Admin; only super nodes reach an edge node's training and evaluation; only admitted nodes
# register, heartbeat or read the chain. A method missing here is refused.
RULES: dict[str, tuple[str, ...]] = {
    "/fledger.v1.Registry/RegisterSuperNode": ("supernode",),
    "/fledger.v1.Registry/ListSuperNodes": (*NODES, "admin"),
    "/fledger.v1.Registry/AssignSuperNode": ("edge",),
    "/fledger.v1.Registry/Heartbeat": ("supernode",),
    "/fledger.v1.SuperNode/RegisterEdge": ("edge",),
    "/fledger.v1.SuperNode/EdgeHeartbeat": ("edge",),
    "/fledger.v1.SuperNode/AnnounceRound": SUPER,
    "/fledger.v1.SuperNode/ProposeBlock": SUPER,
    "/fledger.v1.SuperNode/CommitBlock": SUPER,
    "/fledger.v1.SuperNode/Promise": SUPER,
    "/fledger.v1.SuperNode/GetPrepared": SUPER,
    "/fledger.v1.SuperNode/GetHead": (*NODES, "admin"),
    "/fledger.v1.SuperNode/GetBlocks": SUPER,
    "/fledger.v1.SuperNode/GetModel": (*SUPER, "admin"),
    "/fledger.v1.SuperNode/ListEdges": (*SUPER, "admin"),
    "/fledger.v1.EdgeNode/Fit": SUPER,
    "/fledger.v1.EdgeNode/Evaluate": SUPER,
    "/fledger.v1.EdgeNode/Info": SUPER,
    **{f"/fledger.v1.Admin/{name}": ("admin",) for name in (
        "Status", "Train", "Pause", "Save", "Eval", "ListNodes", "GetBlock", "Verify", "Tokens", "RotateToken",
        "RemoveSuperNode")},
}


# What a caller without a certificate may call: joining, on the entry's plaintext join port.
OPEN_METHODS = ("/fledger.v1.Enrollment/Join",)


def server_credentials(creds: TlsCredentials) -> grpc.ServerCredentials:
    """Mutual TLS: the server shows its certificate and accepts only clients with one from the network's CA (a
    client without one, or with one from another CA, fails the handshake before any RPC)."""
    return grpc.ssl_server_credentials([(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem,
                                       require_client_auth=True)


def channel_credentials(creds: TlsCredentials) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=creds.ca_pem, private_key=creds.key_pem,
                                        certificate_chain=creds.cert_pem)


# Every certificate carries TLS_NAME, so a node is reached at whatever address it advertises (a container name, a
# mapped port) while the server is still checked against the network's CA.
CHANNEL_OPTIONS = [("grpc.ssl_target_name_override", TLS_NAME)]


def peer_identity(context: Context) -> Identity | None:
    """The caller's identity from its verified certificate; None on a plaintext (open mode) connection."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        return None
    try:
        return identity_of(pems[0])
    except PkiError as exc:
        raise ForbiddenError(f"the client certificate is not a fledger node's: {exc}") from exc


def claim(context: Context, node_id: str, public_key: str | None = None) -> Identity | None:
    """Check that a request naming ``node_id`` (and ``public_key``) comes from that node; returns the caller's
    identity (None in open mode, where the field is taken as given)."""
    identity = peer_identity(context)
    if identity is None:
        return None
    if node_id != identity.node_id or (public_key is not None and public_key != identity.public_key):
        raise ForbiddenError(f"this caller is {identity.role} {identity.node_id[:16]}; it may speak only for itself")
    return identity


class Authorizer:
    """The role check of a secure server (``transport.add_service``'s ``authorize``): the caller's certificate role
    must be allowed for the method, and its node must not have been removed from the network."""

    def __init__(self, rules: Mapping[str, Collection[str]] = RULES,
                 revoked: Callable[[str], bool] = lambda node_id: False):
        self.rules = rules
        self.revoked = revoked

    def __call__(self, method: str, context: Context) -> None:
        if method in OPEN_METHODS:
            return
        allowed = self.rules.get(method)
        try:
            identity = peer_identity(context)
        except ForbiddenError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if identity is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          "this node runs in secure mode: connect with a certificate from its network's CA")
        assert identity is not None
        if self.revoked(identity.node_id):
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"node {identity.node_id[:16]} was removed from this network")
        if allowed is None or identity.role not in allowed:
            name = method.rsplit("/", 1)[-1]
            who = "nobody" if not allowed else " or ".join(allowed)
            context.abort(grpc.StatusCode.PERMISSION_DENIED,
                          f"{name} is for {who}; this caller is {identity.role} {identity.node_id[:16]}")


class Revocations:
    """Node ids removed from the network (a removed validator's certificate stays valid until it expires, so the
    entry refuses it by id); kept in memory and, when ``path`` is given, in a file that survives restarts."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._ids: set[str] = set()
        if path is not None and path.exists():
            self._ids = {line.strip() for line in path.read_text().splitlines() if line.strip()}

    def __call__(self, node_id: str) -> bool:
        with self._lock:
            return node_id in self._ids

    def add(self, node_id: str) -> None:
        with self._lock:
            self._ids.add(node_id)
            if self.path is not None:
                write_private(self.path, "".join(f"{i}\n" for i in sorted(self._ids)).encode())
        log.info("node %s is removed from the network; its certificate is refused from now on", node_id[:16])
