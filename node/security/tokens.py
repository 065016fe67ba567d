"""Join tokens and the enrollment handshake: a node proves it holds the operator's token and its ledger key, the
entry proves it holds the same token and the pinned CA, and the node leaves with a certificate."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from chain.encoding import EncodingError, canonical_bytes, is_hex_digest
from chain.keys import PUBLIC_KEY_HEX_LEN, NodeKey, node_id_for, verify_signature
from chain.private import write_private
from node.security.pki import (
    CertificateAuthority,
    Identity,
    PkiError,
    carries_key,
    check_hosts,
    fingerprint,
    identity_of,
    verify_issued,
)

log = logging.getLogger(__name__)

TOKEN_FILES = {"supernode": "join-sn.token", "edge": "join-en.token"}
_ABBREVIATIONS = {"supernode": "sn", "edge": "en"}
_PREFIX = "fledger1"
SECRET_BYTES = 32
NONCE_BYTES = 32
# A P-256 public key PEM is 178 bytes; anything far larger is not one and is not worth parsing.
MAX_TLS_PUBLIC_KEY_BYTES = 1024
_NOT_A_TOKEN = "not a fledger join token (expected fledger1-sn-... or fledger1-en-...)"
_UNKNOWN_TOKEN = "unknown or revoked join token; ask the operator for the current one"


class TokenError(PkiError):
    """A join token cannot be read or used."""


@dataclass(frozen=True)
class JoinToken:
    """What the operator hands a new node: the role it may join as, the CA it must find, and a shared secret."""

    role: str  # "supernode" or "edge"
    ca_fingerprint: str  # 64 hex: pins the network's CA, so a node cannot be enrolled by an impostor entry
    secret: bytes = field(repr=False)  # 32 random bytes; keys both MACs of the handshake, never sent

    def __post_init__(self) -> None:
        if self.role not in TOKEN_FILES:
            raise TokenError(f"a join token's role must be one of {', '.join(TOKEN_FILES)}")
        if not is_hex_digest(self.ca_fingerprint):
            raise TokenError("a join token's CA fingerprint must be 64 lowercase hex characters")
        if len(self.secret) != SECRET_BYTES:
            raise TokenError(f"a join token's secret must be {SECRET_BYTES} bytes")

    @property
    def text(self) -> str:
        secret = base64.b32encode(self.secret).decode("ascii").rstrip("=").lower()
        return f"{_PREFIX}-{_ABBREVIATIONS[self.role]}-{self.ca_fingerprint}-{secret}"

    @property
    def token_id(self) -> str:
        """Public name of the token (sent on the wire); it reveals nothing of the secret."""
        return hashlib.sha256(b"fledger-join-token-id:" + self.secret).hexdigest()[:32]

    @classmethod
    def parse(cls, text: str) -> JoinToken:
        parts = text.strip().lower().split("-")
        roles = {abbreviation: role for role, abbreviation in _ABBREVIATIONS.items()}
        if len(parts) != 4 or parts[0] != _PREFIX or parts[1] not in roles or not is_hex_digest(parts[2]):
            raise TokenError(_NOT_A_TOKEN)
        encoded = parts[3].upper()
        try:
            secret = base64.b32decode(encoded + "=" * (-len(encoded) % 8))
        except (binascii.Error, ValueError) as exc:
            raise TokenError(_NOT_A_TOKEN) from exc
        if len(secret) != SECRET_BYTES:
            raise TokenError(_NOT_A_TOKEN)
        return cls(roles[parts[1]], parts[2], secret)

    @classmethod
    def generate(cls, role: str, ca_fingerprint: str) -> JoinToken:
        return cls(role, ca_fingerprint, secrets.token_bytes(SECRET_BYTES))


def read_token_arg(arg: str) -> JoinToken:
    """The token of ``--join TOKEN`` or ``--join @FILE`` (a file keeps the secret out of ps and shell history)."""
    if not arg.startswith("@"):
        return JoinToken.parse(arg)
    path = Path(arg[1:]).expanduser()
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise TokenError(f"cannot read the join token file {path} ({reason}); check the path after @") from exc
    try:
        return JoinToken.parse(text)
    except TokenError as exc:
        raise TokenError(f"{path}: {exc}") from exc


class TokenStore:
    """The entry's current join tokens, one per role, kept in DATA_ROOT/join-sn.token and join-en.token (0600).
    Only the current token of a role is valid: rotating a role's token revokes the old one."""

    def __init__(self, data_root: Path, ca_fingerprint: str) -> None:
        self._root = data_root
        self._fingerprint = ca_fingerprint
        self._lock = threading.Lock()
        self._tokens: dict[str, JoinToken] = {}
        data_root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for role, name in TOKEN_FILES.items():
            token = self._load(role, data_root / name)
            if token is None:
                self.rotate(role)
            else:
                self._tokens[role] = token

    def _load(self, role: str, path: Path) -> JoinToken | None:
        """The token in ``path`` if it is this role's and pins this CA; None when it must be replaced."""
        if not path.exists():
            return None
        try:
            token = JoinToken.parse(path.read_text(encoding="ascii"))
        except (OSError, UnicodeDecodeError, TokenError) as exc:
            log.warning("%s is unreadable (%s); writing a new %s join token", path, exc, role)
            return None
        if token.role != role or token.ca_fingerprint != self._fingerprint:
            log.warning("%s is not a %s token of this network's CA; writing a new one", path, role)
            return None
        if path.stat().st_mode & 0o077:
            path.chmod(0o600)
        return token

    def current(self, role: str) -> JoinToken:
        if role not in TOKEN_FILES:
            raise TokenError(f"join tokens exist for {' and '.join(TOKEN_FILES)} only")
        with self._lock:
            return self._tokens[role]

    def rotate(self, role: str) -> JoinToken:
        """A new token for ``role``; the old one stops working at once."""
        if role not in TOKEN_FILES:
            raise TokenError(f"join tokens exist for {' and '.join(TOKEN_FILES)} only")
        with self._lock:
            token = JoinToken.generate(role, self._fingerprint)
            write_private(self._root / TOKEN_FILES[role], (token.text + "\n").encode("ascii"), 0o600)
            self._tokens[role] = token
            return token

    def find(self, token_id: str) -> JoinToken | None:
        """The current token named ``token_id``; every token is compared in constant time."""
        wanted = token_id.encode("utf-8", "replace") if isinstance(token_id, str) else b""
        with self._lock:
            tokens = list(self._tokens.values())
        found = None
        for token in tokens:
            if hmac.compare_digest(token.token_id.encode("ascii"), wanted):
                found = token
        return found


def request_message(role: str, token_id: str, public_key: str, tls_public_key_pem: bytes, hosts: Sequence[str],
                    nonce: bytes) -> bytes:
    """The bytes a join request's MAC and key proof cover."""
    return canonical_bytes({"type": "join-request", "role": role, "token_id": token_id, "public_key": public_key,
                            "tls_public_key": tls_public_key_pem.hex(), "hosts": list(hosts), "nonce": nonce.hex()})


def reply_message(nonce: bytes, ca_pem: bytes, cert_pem: bytes) -> bytes:
    """The bytes the entry's reply MAC covers (the nonce ties it to one request)."""
    return canonical_bytes({"type": "join-reply", "nonce": nonce.hex(), "ca": ca_pem.hex(), "cert": cert_pem.hex()})


def mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).digest()


@dataclass(frozen=True)
class JoinRequest:
    """The fields of the proto JoinRequest message."""

    role: str  # "supernode" or "edge"
    token_id: str  # JoinToken.token_id of the token the node holds
    public_key: str  # the node's Ed25519 ledger public key, hex
    tls_public_key: bytes  # PEM of the P-256 key the certificate will carry
    hosts: tuple[str, ...]  # addresses the node serves on, for the certificate's names
    nonce: bytes  # 32 fresh random bytes; the reply must echo them under the MAC
    key_proof: bytes  # Ed25519 signature of request_message by public_key: the node holds its ledger key
    mac: bytes  # HMAC-SHA256 of request_message under the token's secret: the node holds the token

    def message(self) -> bytes:
        return request_message(self.role, self.token_id, self.public_key, self.tls_public_key, self.hosts,
                               self.nonce)


def make_request(token: JoinToken, ledger_key: NodeKey, tls_public_key_pem: bytes,
                 hosts: Sequence[str]) -> JoinRequest:
    nonce = secrets.token_bytes(NONCE_BYTES)
    unsigned = JoinRequest(token.role, token.token_id, ledger_key.public_hex, tls_public_key_pem,
                           check_hosts(hosts), nonce, b"", b"")
    message = unsigned.message()
    return JoinRequest(unsigned.role, unsigned.token_id, unsigned.public_key, tls_public_key_pem, unsigned.hosts,
                       nonce, ledger_key.sign(message), mac(token.secret, message))


class JoinRefused(PkiError):
    """The entry refuses a join; the message is short and safe to send back."""


class Enroller:
    """The entry's side: checks a join request and issues the certificate."""

    def __init__(self, ca: CertificateAuthority, tokens: TokenStore) -> None:
        self.ca = ca
        self.tokens = tokens

    def join(self, request: JoinRequest) -> tuple[bytes, bytes, bytes]:
        """(CA PEM, certificate PEM, reply MAC) for a valid request; JoinRefused otherwise."""
        if request.role not in TOKEN_FILES:
            raise JoinRefused(f"role must be {' or '.join(TOKEN_FILES)}")
        token = self.tokens.find(request.token_id)
        if token is None or token.role != request.role:
            raise JoinRefused(_UNKNOWN_TOKEN)
        if len(request.nonce) != NONCE_BYTES:
            raise JoinRefused(f"nonce must be {NONCE_BYTES} bytes")
        if len(request.tls_public_key) > MAX_TLS_PUBLIC_KEY_BYTES:
            raise JoinRefused("tls_public_key is too large for a P-256 public key")
        try:
            hosts = check_hosts(request.hosts)
            message = request.message()
        except (PkiError, EncodingError) as exc:
            raise JoinRefused(str(exc) if isinstance(exc, PkiError) else "hosts must be strings") from exc
        if not hmac.compare_digest(mac(token.secret, message), request.mac):
            raise JoinRefused("join request MAC does not match the token; check the token")
        if not is_hex_digest(request.public_key, PUBLIC_KEY_HEX_LEN):
            raise JoinRefused(f"public_key must be {PUBLIC_KEY_HEX_LEN} lowercase hex characters (Ed25519)")
        if not verify_signature(request.public_key, request.key_proof, message):
            raise JoinRefused("key_proof is not a signature of the request by public_key")
        try:
            cert_pem = self.ca.issue(request.role, node_id_for(request.public_key), request.public_key,
                                     request.tls_public_key, hosts)
        except PkiError as exc:
            raise JoinRefused(str(exc)) from exc
        log.info("issued a %s certificate to node %s", request.role, node_id_for(request.public_key))
        return self.ca.cert_pem, cert_pem, mac(token.secret, reply_message(request.nonce, self.ca.cert_pem, cert_pem))


def accept_reply(token: JoinToken, request: JoinRequest, ca_pem: bytes, cert_pem: bytes, reply_mac: bytes) -> None:
    """Check the entry's answer before trusting it: pinned CA, MAC under the token, our identity, our key."""
    if not hmac.compare_digest(fingerprint(ca_pem), token.ca_fingerprint):
        raise PkiError("the entry's CA does not match the token's pin; check the token and the --entry address")
    if not hmac.compare_digest(mac(token.secret, reply_message(request.nonce, ca_pem, cert_pem)), reply_mac):
        raise PkiError("the entry's reply MAC does not match the token; check the token and the --entry address")
    expected = Identity(token.role, node_id_for(request.public_key), request.public_key)
    if identity_of(cert_pem) != expected:
        raise PkiError("the entry issued a certificate for another identity; join again")
    if not verify_issued(ca_pem, cert_pem):
        raise PkiError("the entry's certificate is not signed by its CA or not valid now; check the entry's clock")
    if not carries_key(cert_pem, request.tls_public_key):
        raise PkiError("the entry's certificate carries another TLS key; join again")

