"""The network's certificate authority and the X.509 certificates it issues: who a TLS peer is, checked offline."""
from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chain.encoding import is_hex_digest
from chain.keys import NODE_ID_HEX_LEN, PUBLIC_KEY_HEX_LEN, node_id_for
from chain.private import private_dir, write_private

ROLES = ("entry", "supernode", "edge", "admin")
# Every certificate carries this DNS name, so clients can dial any address and still check the name:
# they set grpc.ssl_target_name_override to it.
TLS_NAME = "fledger-node"
ADMIN_ID = "admin"
MAX_HOSTS = 16
MAX_HOST_LEN = 253
CA_DAYS = 3650
CA_CERT, CA_KEY = "ca.crt", "ca.key"
TLS_KEY, TLS_CERT = "tls.key", "tls.crt"

_URN = "urn:fledger:"
_HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")
# Backdating covers clocks a little behind the CA's.
_BACKDATE = timedelta(minutes=1)


class PkiError(Exception):
    """A certificate, key or CA file cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Identity:
    """What a peer certificate proves."""

    role: str  # one of ROLES
    node_id: str  # chain.keys.node_id_for(public_key); "admin" for the operator
    public_key: str  # the node's Ed25519 ledger public key, hex; "" for the operator


def _load_cert(cert_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except (ValueError, TypeError) as exc:
        raise PkiError("not a PEM X.509 certificate; check the file or the peer") from exc


@lru_cache(maxsize=1024)
def identity_of(cert_pem: bytes) -> Identity:
    """The identity a fledger certificate names (cached: every call a servicer serves asks for it)."""
    cert = _load_cert(cert_pem)
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound as exc:
        raise PkiError("certificate has no subject alternative names; it is not a fledger certificate") from exc
    fields: dict[str, list[str]] = {"role": [], "node": [], "key": []}
    for uri in uris:
        kind, _, value = uri.removeprefix(_URN).partition(":") if uri.startswith(_URN) else ("", "", "")
        if kind in fields:
            fields[kind].append(value)
    if len(fields["role"]) != 1 or len(fields["node"]) != 1 or len(fields["key"]) > 1:
        raise PkiError("certificate does not name exactly one fledger role and node; it is not a fledger certificate")
    role, node_id, keys = fields["role"][0], fields["node"][0], fields["key"]
    if role not in ROLES:
        raise PkiError(f"certificate names an unknown role (expected one of {', '.join(ROLES)})")
    public_key = keys[0] if keys else ""
    try:
        _check_subject(role, node_id, public_key)
    except PkiError as exc:
        raise PkiError(f"certificate {exc}") from exc
    return Identity(role, node_id, public_key)


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the certificate's DER, hex: what a join token pins."""
    return hashlib.sha256(_load_cert(cert_pem).public_bytes(serialization.Encoding.DER)).hexdigest()


def verify_issued(ca_pem: bytes, cert_pem: bytes) -> bool:
    """True when ``ca_pem`` signed ``cert_pem`` and both are within their validity dates now."""
    try:
        ca, cert = _load_cert(ca_pem), _load_cert(cert_pem)
        cert.verify_directly_issued_by(ca)
    except (PkiError, ValueError, TypeError, InvalidSignature):
        return False
    now = datetime.now(timezone.utc)
    return all(c.not_valid_before_utc <= now <= c.not_valid_after_utc for c in (ca, cert))


def new_tls_key() -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key (BoringSSL's safest common ground) as (PKCS8 private PEM, public PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return private, public


def check_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """The hosts a certificate may name: at most MAX_HOSTS IP addresses or DNS names (they can come off the wire)."""
    if len(hosts) > MAX_HOSTS:
        raise PkiError(f"at most {MAX_HOSTS} hosts may be named; name fewer")
    for host in hosts:
        if not isinstance(host, str) or not 0 < len(host) <= MAX_HOST_LEN:
            raise PkiError(f"each host must be 1 to {MAX_HOST_LEN} characters; shorten it")
        if not _is_ip(host) and not _HOST_NAME.fullmatch(host):
            raise PkiError(f"host {host[:40]!r} is neither an IP address nor a DNS name; fix it")
    return tuple(hosts)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_subject(role: str, node_id: str, public_key: str) -> None:
    if role not in ROLES:
        raise PkiError(f"role must be one of {', '.join(ROLES)}")
    if role == "admin":
        if node_id != ADMIN_ID or public_key:
            raise PkiError(f"admin identity must have node id {ADMIN_ID!r} and no public key")
        return
    if not is_hex_digest(public_key, PUBLIC_KEY_HEX_LEN) or not is_hex_digest(node_id, NODE_ID_HEX_LEN):
        raise PkiError(f"node id and public key must be lowercase hex of {NODE_ID_HEX_LEN} and "
                       f"{PUBLIC_KEY_HEX_LEN} characters")
    if node_id != node_id_for(public_key):
        raise PkiError("node id is not the id of the public key; derive it with chain.keys.node_id_for")


def _load_p256_public(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise PkiError("TLS public key is not a PEM public key; send the one new_tls_key made") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError("TLS public key must be ECDSA P-256 (grpc needs it); make one with new_tls_key")
    return key


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise PkiError(f"{path} is missing; {what}") from exc
    except OSError as exc:
        raise PkiError(f"cannot read {path} ({exc.strerror}); check its permissions") from exc


def _load_private_key(path: Path, data: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"{path} is not an unencrypted PEM private key; restore it from a backup") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path} is not an ECDSA P-256 key; restore it from a backup")
    return key


def _spki(key: ec.EllipticCurvePublicKey | x509.Certificate) -> bytes:
    public = key.public_key() if isinstance(key, x509.Certificate) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _same_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return _spki(cert) == _spki(key.public_key())


def carries_key(cert_pem: bytes, tls_public_key_pem: bytes) -> bool:
    """True when the certificate is for that TLS public key (PEM); a joining node checks it got its own key."""
    try:
        return _spki(_load_cert(cert_pem)) == _spki(_load_p256_public(tls_public_key_pem))
    except PkiError:
        return False


@dataclass(frozen=True)
class CertificateAuthority:
    """The network's CA, kept by the entry super node: it signs every node's and the operator's certificate."""

    cert_pem: bytes
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.cert_pem))

    @classmethod
    def create(cls, directory: Path, network_name: str = "fledger") -> CertificateAuthority:
        """A new self-signed CA written to directory/ca.crt and ca.key; never overwrites one."""
        if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
            raise PkiError(f"{directory} already holds a CA; load it, or move it away to start a new network")
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{network_name} network CA")])
        now = datetime.now(timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE).not_valid_after(now + timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(_key_usage(cert_sign=True), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        private_dir(directory)
        write_private(directory / CA_KEY, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        write_private(directory / CA_CERT, cert_pem, 0o644)
        return cls(cert_pem, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """The CA in directory/ca.crt and ca.key, checked to belong together."""
        restore = "restore it from a backup, or move the directory away to start a new network"
        cert_pem, key_path = _read(directory / CA_CERT, restore), directory / CA_KEY
        key = _load_private_key(key_path, _read(key_path, restore))
        try:
            cert = _load_cert(cert_pem)
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except (PkiError, x509.ExtensionNotFound) as exc:
            raise PkiError(f"{directory / CA_CERT} is not a CA certificate; {restore}") from exc
        if not is_ca or not _same_key(cert, key):
            raise PkiError(f"{directory / CA_CERT} is not the CA certificate of {key_path}; {restore}")
        return cls(cert_pem, key)

    @classmethod
    def load_or_create(cls, directory: Path, network_name: str = "fledger") -> CertificateAuthority:
        if (directory / CA_CERT).exists() or (directory / CA_KEY).exists():
            return cls.load(directory)
        return cls.create(directory, network_name)

    def issue(self, role: str, node_id: str, public_key: str, tls_public_key_pem: bytes,
              hosts: Sequence[str] = (), days: int = 825) -> bytes:
        """A certificate (PEM) binding a TLS key to a role and a ledger identity; valid for both TLS ends."""
        _check_subject(role, node_id, public_key)
        tls_key = _load_p256_public(tls_public_key_pem)
        if days < 1:
            raise PkiError("a certificate must be valid for at least one day")
        ca_cert = _load_cert(self.cert_pem)
        names: list[x509.GeneralName] = [x509.DNSName(TLS_NAME)]
        for host in check_hosts(hosts):
            names.append(x509.IPAddress(ipaddress.ip_address(host)) if _is_ip(host) else x509.DNSName(host))
        uris = [f"role:{role}", f"node:{node_id}"] + ([f"key:{public_key}"] if public_key else [])
        names += [x509.UniformResourceIdentifier(_URN + uri) for uri in uris]
        now = datetime.now(timezone.utc)
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
                .issuer_name(ca_cert.subject).public_key(tls_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - _BACKDATE)
                .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(_key_usage(cert_sign=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(tls_key), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(self.key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a node's ECDHE handshake signs and agrees keys."""
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=not cert_sign, key_cert_sign=cert_sign,
                         crl_sign=cert_sign, encipher_only=False, decipher_only=False)


@dataclass(frozen=True)
class TlsCredentials:
    """What a node (or the operator) holds to speak mutual TLS: its key, its certificate and the network's CA."""

    key_pem: bytes = field(repr=False)
    cert_pem: bytes
    ca_pem: bytes

    @property
    def identity(self) -> Identity:
        return identity_of(self.cert_pem)

    @staticmethod
    def exists(directory: Path) -> bool:
        return all((directory / name).exists() for name in (TLS_KEY, TLS_CERT, CA_CERT))

    @classmethod
    def load(cls, directory: Path) -> TlsCredentials:
        """The credentials in directory/tls.key, tls.crt and ca.crt, checked to belong together."""
        missing = [name for name in (TLS_KEY, TLS_CERT, CA_CERT) if not (directory / name).exists()]
        if missing:
            raise PkiError(f"{directory} has no {', '.join(missing)}; join the network with --join TOKEN first")
        rejoin = "join again with --join TOKEN"
        key_pem, cert_pem, ca_pem = (_read(directory / name, rejoin) for name in (TLS_KEY, TLS_CERT, CA_CERT))
        key = _load_private_key(directory / TLS_KEY, key_pem)
        try:
            identity_of(cert_pem)
        except PkiError as exc:
            raise PkiError(f"{directory / TLS_CERT}: {exc}; {rejoin}") from exc
        if not _same_key(_load_cert(cert_pem), key):
            raise PkiError(f"{directory / TLS_CERT} is not the certificate of {directory / TLS_KEY}; {rejoin}")
        if not verify_issued(ca_pem, cert_pem):
            raise PkiError(f"{directory / TLS_CERT} is expired or not signed by {directory / CA_CERT}; {rejoin}")
        return cls(key_pem, cert_pem, ca_pem)

    def save(self, directory: Path) -> None:
        private_dir(directory)
        write_private(directory / TLS_KEY, self.key_pem, 0o600)
        write_private(directory / TLS_CERT, self.cert_pem, 0o644)
        write_private(directory / CA_CERT, self.ca_pem, 0o644)


def issue_local(ca: CertificateAuthority, directory: Path, role: str, node_id: str, public_key: str,
                hosts: Sequence[str] = ()) -> TlsCredentials:
    """Credentials the CA's holder makes for itself (the entry's own identity, the operator's): no join needed."""
    key_pem, public_pem = new_tls_key()
    credentials = TlsCredentials(key_pem, ca.issue(role, node_id, public_key, public_pem, hosts), ca.cert_pem)
    credentials.save(directory)
    return credentials


def write_admin_identity(ca: CertificateAuthority, directory: Path) -> TlsCredentials:
    """The operator's credentials (role admin), for the console."""
    return issue_local(ca, directory, "admin", ADMIN_ID, "")
