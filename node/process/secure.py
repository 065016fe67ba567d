"""Which mode a node runs in, and what secure mode needs on disk: the entry's CA, its own certificate, the
operator's identity and the join tokens; a joining node's certificate, got once with a join token.

Files in a node's data root (all folders 0700, keys 0600):
- entry: ``ca/`` (ca.crt, ca.key), ``tls/`` (its own certificate), ``admin/`` (the operator's identity, for
  ``console.py --identity``), ``join-sn.token`` and ``join-en.token``, ``revoked`` (node ids removed);
- any other node: ``tls/`` (tls.key, tls.crt, ca.crt), written when it joins with ``--join``.
"""
from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from chain.keys import NodeKey
from config import Config, ConfigError
from node.engine.errors import NetError
from node.rpc.clients import join_network
from node.rpc.security import Authorizer, Revocations
from node.security.pki import CertificateAuthority, PkiError, TlsCredentials, issue_local, write_admin_identity
from node.security.tokens import Enroller, TokenStore, read_token_arg

log = logging.getLogger(__name__)

CA_DIR, TLS_DIR, ADMIN_DIR, REVOKED_FILE = "ca", "tls", "admin", "revoked"

_NAME = {"supernode": "a super node", "edge": "an edge node"}

OPEN_MODE_WARNING = ("warning: open mode: anyone who can reach {address} can join this network and control it "
                     "(no TLS, no admission); use --secure outside a trusted loopback test")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def wants_secure(cfg: Config, data_root: Path) -> bool:
    """Secure mode when asked (--secure, --join), when the node was secure before (its certificate or CA is on
    disk), or when it binds a non-loopback address; open mode only on loopback, or with an explicit --insecure."""
    if cfg.secure and cfg.insecure:
        raise ConfigError("--secure and --insecure contradict each other; pick one")
    if cfg.insecure:
        if cfg.join:
            raise ConfigError("--join is for secure mode; drop --insecure")
        return False
    if cfg.secure or cfg.join:
        return True
    if (data_root / TLS_DIR).exists() or (data_root / CA_DIR).exists() or any(data_root.glob(f"edge-*/{TLS_DIR}")):
        return True   # it joined before (an edge host keeps one certificate per hosted edge node)
    if not is_loopback(cfg.ip):
        raise ConfigError(f"binding {cfg.ip} in open mode would let anyone who reaches it control the network: "
                          "use --secure (and --join TOKEN on nodes other than the entry), or --insecure to accept "
                          "that")
    return False


def join_port_address(cfg: Config, advertised_host: str) -> str:
    """Where the entry serves joins: --join-port, else the port after its own (any free one with --port 0)."""
    port = cfg.join_port if cfg.join_port is not None else (cfg.port + 1 if cfg.port else 0)
    return f"{cfg.ip}:{port}"


@dataclass
class EntrySecurity:
    """The entry's secure-mode parts."""

    credentials: TlsCredentials
    ca: CertificateAuthority
    tokens: TokenStore
    enroller: Enroller
    revocations: Revocations
    authorizer: Authorizer


def entry_security(data_root: Path, key: NodeKey, hosts: list[str]) -> EntrySecurity:
    """Create (first start) or load the network's CA, the entry's certificate, the operator's identity and the
    join tokens."""
    try:
        ca = CertificateAuthority.load_or_create(data_root / CA_DIR)
        tls = data_root / TLS_DIR
        credentials = TlsCredentials.load(tls) if TlsCredentials.exists(tls) else None
        if credentials is None or credentials.ca_pem != ca.cert_pem \
                or credentials.identity.public_key != key.public_hex:
            credentials = issue_local(ca, tls, "entry", key.node_id, key.public_hex, hosts)
        if not TlsCredentials.exists(data_root / ADMIN_DIR):
            write_admin_identity(ca, data_root / ADMIN_DIR)
        tokens = TokenStore(data_root, ca.fingerprint)
    except PkiError as exc:
        raise ConfigError(str(exc)) from exc
    revocations = Revocations(data_root / REVOKED_FILE)
    return EntrySecurity(credentials, ca, tokens, Enroller(ca, tokens), revocations, Authorizer(revoked=revocations))


def joined_credentials(data_root: Path, key: NodeKey, role: str, cfg: Config, hosts: list[str]) -> TlsCredentials:
    """This node's certificate: the one it got when it joined, or a new one got now with --join."""
    tls = data_root / TLS_DIR
    if TlsCredentials.exists(tls):
        try:
            credentials = TlsCredentials.load(tls)
            identity = credentials.identity
        except PkiError as exc:
            raise ConfigError(str(exc)) from exc
        if identity.public_key == key.public_hex and identity.role == role:
            return credentials
        log.warning("the certificate in %s is not this %s's; joining again", tls, role)
    if not cfg.join:
        raise ConfigError(f"this {_NAME[role].split(' ', 1)[1]} has no certificate yet: join with --join TOKEN "
                          f"or --join @FILE (the entry writes join-{'sn' if role == 'supernode' else 'en'}.token in "
                          "its data root; the console prints it with tokens())")
    if not cfg.entry:
        raise ConfigError("--join needs --entry HOST:PORT of the entry super node")
    try:
        token = read_token_arg(cfg.join)
    except PkiError as exc:
        raise ConfigError(str(exc)) from exc
    if token.role != role:
        raise ConfigError(f"--join was given a {token.role} token; {_NAME[role]} joins with the entry's "
                          f"join-{'sn' if role == 'supernode' else 'en'}.token")
    address = cfg.join_address or _next_port(cfg.entry)
    try:
        credentials = join_network(address, token, key, hosts)
    except NetError as exc:
        raise ConfigError(f"cannot join at {address}: {exc}") from exc
    except PkiError as exc:
        raise ConfigError(f"join at {address} failed: {exc}") from exc
    credentials.save(tls)
    log.info("joined the network as %s %s; certificate in %s", role, key.node_id[:16], tls)
    return credentials


def _next_port(address: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--entry must be HOST:PORT, got {address!r}")
    return f"{host}:{int(port) + 1}"
