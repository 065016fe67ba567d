"""Secure mode's PKI with real crypto: the CA and its files, certificates and the identities they prove, join
tokens and their store, the enrollment handshake and its refusals, and mutual TLS through a real grpc server."""
from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
from concurrent import futures
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from chain.keys import NodeKey
from node.security.pki import (
    ROLES,
    TLS_NAME,
    CertificateAuthority,
    Identity,
    PkiError,
    TlsCredentials,
    fingerprint,
    identity_of,
    issue_local,
    new_tls_key,
    verify_issued,
    write_admin_identity,
)
from node.security.tokens import (
    TOKEN_FILES,
    Enroller,
    JoinRefused,
    JoinToken,
    TokenError,
    TokenStore,
    accept_reply,
    mac,
    make_request,
    read_token_arg,
    reply_message,
)

SN_KEY = NodeKey.from_seed(b"supernode")
EN_KEY = NodeKey.from_seed(b"edge")


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.create(tmp_path / "ca")


def subject_of(role: str, key: NodeKey = SN_KEY) -> tuple[str, str]:
    return ("admin", "") if role == "admin" else (key.node_id, key.public_hex)


def custom_cert(uris: list[str], signer: ec.EllipticCurvePrivateKey | None = None, issuer: x509.Name | None = None,
                days: tuple[int, int] = (-1, 1)) -> bytes:
    """A certificate made by hand, to show what identity_of and verify_issued refuse."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hand-made")])
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + timedelta(days=days[0])).not_valid_after(now + timedelta(days=days[1]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]
                                                       + [x509.UniformResourceIdentifier(u) for u in uris]),
                           critical=False)
            .sign(signer or key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


# --- the CA ---------------------------------------------------------------------------------------------------


def test_ca_create_writes_key_0600_and_cert_0644_in_a_0700_directory(tmp_path):
    CertificateAuthority.create(tmp_path / "ca")
    assert (mode(tmp_path / "ca"), mode(tmp_path / "ca" / "ca.key"), mode(tmp_path / "ca" / "ca.crt")) == \
        (0o700, 0o600, 0o644)


def test_ca_cert_is_a_self_signed_p256_ca_limited_to_issuing_leaves(ca):
    cert = x509.load_pem_x509_certificate(ca.cert_pem)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (constraints.ca, constraints.path_length, usage.key_cert_sign, usage.crl_sign) == (True, 0, True, True)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert cert.subject.rfc4514_string() == "CN=fledger network CA"
    assert verify_issued(ca.cert_pem, ca.cert_pem)


def test_ca_load_returns_the_same_ca(tmp_path, ca):
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert (loaded.cert_pem, loaded.fingerprint) == (ca.cert_pem, ca.fingerprint)


def test_ca_create_refuses_to_overwrite_an_existing_ca(tmp_path, ca):
    with pytest.raises(PkiError, match="already holds a CA"):
        CertificateAuthority.create(tmp_path / "ca")
    assert CertificateAuthority.load(tmp_path / "ca").cert_pem == ca.cert_pem


def test_ca_load_names_the_missing_key_file(tmp_path, ca):
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(PkiError, match="ca.key is missing"):
        CertificateAuthority.load(tmp_path / "ca")


def test_ca_load_or_create_refuses_a_half_ca_instead_of_replacing_it(tmp_path, ca):
    (tmp_path / "ca" / "ca.crt").unlink()
    with pytest.raises(PkiError, match="ca.crt is missing"):
        CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.mark.parametrize("name", ["ca.crt", "ca.key"])
def test_ca_load_names_a_corrupt_file(tmp_path, ca, name):
    (tmp_path / "ca" / name).write_bytes(b"garbage")
    with pytest.raises(PkiError, match=name):
        CertificateAuthority.load(tmp_path / "ca")


def test_ca_load_refuses_a_certificate_of_another_key(tmp_path, ca):
    other = CertificateAuthority.create(tmp_path / "other")
    (tmp_path / "ca" / "ca.crt").write_bytes(other.cert_pem)
    with pytest.raises(PkiError, match="not the CA certificate"):
        CertificateAuthority.load(tmp_path / "ca")


def test_ca_load_or_create_creates_once_then_loads(tmp_path):
    created = CertificateAuthority.load_or_create(tmp_path / "ca", "testnet")
    assert CertificateAuthority.load_or_create(tmp_path / "ca").fingerprint == created.fingerprint


def test_fingerprint_is_sha256_of_the_der(ca):
    der = x509.load_pem_x509_certificate(ca.cert_pem).public_bytes(serialization.Encoding.DER)
    assert fingerprint(ca.cert_pem) == hashlib.sha256(der).hexdigest() == ca.fingerprint


# --- issued certificates and identities ------------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_issue_then_identity_of_gives_back_role_node_and_key(ca, role):
    node_id, public_key = subject_of(role)
    cert = ca.issue(role, node_id, public_key, new_tls_key()[1])
    assert identity_of(cert) == Identity(role, node_id, public_key)


def test_issued_cert_names_tls_name_hosts_and_is_a_leaf_for_both_tls_ends(ca):
    cert = x509.load_pem_x509_certificate(
        ca.issue("supernode", SN_KEY.node_id, SN_KEY.public_hex, new_tls_key()[1], ["10.0.0.7", "sn1.example"]))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [TLS_NAME, "sn1.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert sorted(san.get_values_for_type(x509.UniformResourceIdentifier)) == sorted(
        ["urn:fledger:role:supernode", f"urn:fledger:node:{SN_KEY.node_id}", f"urn:fledger:key:{SN_KEY.public_hex}"])
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.subject.rfc4514_string() == f"CN={SN_KEY.node_id}"


def test_admin_cert_carries_no_key_uri(ca):
    cert = x509.load_pem_x509_certificate(ca.issue("admin", "admin", "", new_tls_key()[1]))
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier)
    assert sorted(uris) == ["urn:fledger:node:admin", "urn:fledger:role:admin"]


def test_issue_refuses_a_node_id_that_is_not_the_keys(ca):
    with pytest.raises(PkiError, match="not the id of the public key"):
        ca.issue("edge", EN_KEY.node_id, SN_KEY.public_hex, new_tls_key()[1])


def test_issue_refuses_an_unknown_role(ca):
    with pytest.raises(PkiError, match="role must be one of"):
        ca.issue("king", SN_KEY.node_id, SN_KEY.public_hex, new_tls_key()[1])


@pytest.mark.parametrize("key", [ec.generate_private_key(ec.SECP384R1()), ed25519.Ed25519PrivateKey.generate()],
                         ids=["p384", "ed25519"])
def test_issue_refuses_a_tls_key_that_is_not_p256(ca, key):
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(PkiError, match="P-256"):
        ca.issue("edge", EN_KEY.node_id, EN_KEY.public_hex, pem)


@pytest.mark.parametrize("hosts", [[f"h{i}" for i in range(17)], ["a" * 254], ["bad host"], [""]],
                         ids=["17-hosts", "254-chars", "space", "empty"])
def test_issue_refuses_hosts_over_the_limits(ca, hosts):
    with pytest.raises(PkiError, match="host"):
        ca.issue("edge", EN_KEY.node_id, EN_KEY.public_hex, new_tls_key()[1], hosts)


def test_identity_of_refuses_a_cert_without_fledger_names():
    with pytest.raises(PkiError, match="not a fledger certificate"):
        identity_of(custom_cert([]))


def test_identity_of_refuses_two_role_uris():
    uris = ["urn:fledger:role:edge", "urn:fledger:role:supernode", f"urn:fledger:node:{EN_KEY.node_id}",
            f"urn:fledger:key:{EN_KEY.public_hex}"]
    with pytest.raises(PkiError, match="exactly one"):
        identity_of(custom_cert(uris))


def test_identity_of_refuses_an_unknown_role():
    uris = ["urn:fledger:role:king", f"urn:fledger:node:{EN_KEY.node_id}", f"urn:fledger:key:{EN_KEY.public_hex}"]
    with pytest.raises(PkiError, match="unknown role"):
        identity_of(custom_cert(uris))


def test_identity_of_refuses_a_key_uri_of_another_node():
    uris = ["urn:fledger:role:edge", f"urn:fledger:node:{EN_KEY.node_id}", f"urn:fledger:key:{SN_KEY.public_hex}"]
    with pytest.raises(PkiError, match="not the id of the public key"):
        identity_of(custom_cert(uris))


def test_identity_of_refuses_what_is_not_a_certificate():
    with pytest.raises(PkiError, match="not a PEM X.509 certificate"):
        identity_of(b"garbage")


def test_verify_issued_accepts_the_cas_own_cert(ca):
    assert verify_issued(ca.cert_pem, ca.issue("edge", EN_KEY.node_id, EN_KEY.public_hex, new_tls_key()[1]))


def test_verify_issued_refuses_a_cert_from_another_ca(tmp_path, ca):
    other = CertificateAuthority.create(tmp_path / "other")
    assert not verify_issued(ca.cert_pem, other.issue("edge", EN_KEY.node_id, EN_KEY.public_hex, new_tls_key()[1]))


def test_verify_issued_refuses_an_impostor_ca_with_the_same_name(tmp_path, ca):
    impostor = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.load_pem_x509_certificate(ca.cert_pem).subject
    assert not verify_issued(ca.cert_pem, custom_cert([], signer=impostor, issuer=issuer))


def test_verify_issued_refuses_an_expired_cert(ca):
    issuer = x509.load_pem_x509_certificate(ca.cert_pem).subject
    assert verify_issued(ca.cert_pem, custom_cert([], signer=ca.key, issuer=issuer))
    assert not verify_issued(ca.cert_pem, custom_cert([], signer=ca.key, issuer=issuer, days=(-10, -1)))


# --- credentials on disk ---------------------------------------------------------------------------------------


def test_issue_local_saves_credentials_that_load_back_with_private_modes(tmp_path, ca):
    saved = issue_local(ca, tmp_path / "tls", "entry", SN_KEY.node_id, SN_KEY.public_hex, ["127.0.0.1"])
    loaded = TlsCredentials.load(tmp_path / "tls")
    assert loaded == saved
    assert loaded.identity == Identity("entry", SN_KEY.node_id, SN_KEY.public_hex)
    assert (mode(tmp_path / "tls"), mode(tmp_path / "tls" / "tls.key"), mode(tmp_path / "tls" / "tls.crt"),
            mode(tmp_path / "tls" / "ca.crt")) == (0o700, 0o600, 0o644, 0o644)
    assert sorted(p.name for p in (tmp_path / "tls").iterdir()) == ["ca.crt", "tls.crt", "tls.key"]


def test_tls_credentials_load_says_to_join_first_when_nothing_is_there(tmp_path):
    assert not TlsCredentials.exists(tmp_path)
    with pytest.raises(PkiError, match="join the network with --join TOKEN first"):
        TlsCredentials.load(tmp_path)


def test_tls_credentials_load_refuses_a_key_that_is_not_the_certs(tmp_path, ca):
    issue_local(ca, tmp_path / "tls", "edge", EN_KEY.node_id, EN_KEY.public_hex)
    (tmp_path / "tls" / "tls.key").write_bytes(new_tls_key()[0])
    with pytest.raises(PkiError, match="is not the certificate of"):
        TlsCredentials.load(tmp_path / "tls")


def test_tls_credentials_load_refuses_a_cert_of_another_ca(tmp_path, ca):
    issue_local(ca, tmp_path / "tls", "edge", EN_KEY.node_id, EN_KEY.public_hex)
    (tmp_path / "tls" / "ca.crt").write_bytes(CertificateAuthority.create(tmp_path / "other").cert_pem)
    with pytest.raises(PkiError, match="not signed by"):
        TlsCredentials.load(tmp_path / "tls")


def test_write_admin_identity_makes_an_admin_certificate(tmp_path, ca):
    credentials = write_admin_identity(ca, tmp_path / "admin")
    assert TlsCredentials.load(tmp_path / "admin").identity == Identity("admin", "admin", "")
    assert credentials.ca_pem == ca.cert_pem


# --- join tokens -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("role, prefix", [("supernode", "fledger1-sn-"), ("edge", "fledger1-en-")])
def test_token_text_round_trips(role, prefix):
    token = JoinToken.generate(role, "ab" * 32)
    assert token.text.startswith(prefix + "ab" * 32 + "-")
    assert token.text == token.text.lower() and "=" not in token.text
    assert JoinToken.parse(f"  {token.text}\n") == token


def test_token_id_is_the_public_hash_of_the_secret():
    token = JoinToken("edge", "00" * 32, bytes(32))
    assert token.token_id == hashlib.sha256(b"fledger-join-token-id:" + bytes(32)).hexdigest()[:32]
    assert token.text == "fledger1-en-" + "00" * 32 + "-" + "a" * 52


def test_token_repr_hides_the_secret():
    token = JoinToken.generate("edge", "00" * 32)
    assert token.secret.hex() not in repr(token) and str(token.secret) not in repr(token)


FP, SECRET = "00" * 32, "a" * 52


@pytest.mark.parametrize("text", ["", "hello", f"fledger1-xx-{FP}-{SECRET}", f"fledger2-en-{FP}-{SECRET}",
                                  f"fledger1-en-{FP[1:]}-{SECRET}", f"fledger1-en-{FP}-{SECRET[2:]}",
                                  f"fledger1-en-{FP}-{'1' * 52}", f"fledger1-en-{FP}-{SECRET}-extra"],
                         ids=["empty", "word", "role", "version", "fingerprint", "short-secret", "not-base32",
                              "extra-part"])
def test_token_parse_refuses_what_is_not_a_token(text):
    with pytest.raises(TokenError, match=r"^not a fledger join token \(expected fledger1-sn-\.\.\. or fledger1-en"):
        JoinToken.parse(text)


def test_read_token_arg_takes_the_token_or_a_file_after_at(tmp_path):
    token = JoinToken.generate("supernode", "cd" * 32)
    (tmp_path / "join.token").write_text(token.text + "\n")
    assert read_token_arg(token.text) == read_token_arg(f"@{tmp_path / 'join.token'}") == token


def test_read_token_arg_names_a_file_it_cannot_read(tmp_path):
    with pytest.raises(TokenError, match="missing.token"):
        read_token_arg(f"@{tmp_path / 'missing.token'}")


def test_read_token_arg_names_a_file_that_holds_no_token(tmp_path):
    (tmp_path / "join.token").write_text("nonsense")
    with pytest.raises(TokenError, match="join.token: not a fledger join token"):
        read_token_arg(f"@{tmp_path / 'join.token'}")


def test_token_store_writes_one_0600_file_per_role_and_reloads_the_same_tokens(tmp_path, ca):
    store = TokenStore(tmp_path, ca.fingerprint)
    assert {mode(tmp_path / name) for name in TOKEN_FILES.values()} == {0o600}
    reloaded = TokenStore(tmp_path, ca.fingerprint)
    assert [reloaded.current(r) for r in TOKEN_FILES] == [store.current(r) for r in TOKEN_FILES]
    assert JoinToken.parse((tmp_path / "join-en.token").read_text()) == store.current("edge")


def test_token_store_rotation_revokes_the_old_token_and_persists_the_new(tmp_path, ca):
    store = TokenStore(tmp_path, ca.fingerprint)
    old = store.current("edge")
    new = store.rotate("edge")
    assert (store.find(old.token_id), store.find(new.token_id)) == (None, new)
    assert TokenStore(tmp_path, ca.fingerprint).current("edge") == new
    assert mode(tmp_path / "join-en.token") == 0o600


def test_token_store_replaces_a_token_that_pins_another_ca(tmp_path, ca):
    stale = JoinToken.generate("supernode", "ee" * 32)
    (tmp_path / "join-sn.token").write_text(stale.text)
    token = TokenStore(tmp_path, ca.fingerprint).current("supernode")
    assert token.ca_fingerprint == ca.fingerprint and token != stale


def test_token_store_finds_only_current_token_ids(tmp_path, ca):
    store = TokenStore(tmp_path, ca.fingerprint)
    assert store.find(store.current("supernode").token_id) == store.current("supernode")
    assert store.find("00" * 16) is None and store.find("é") is None


# --- the enrollment handshake ----------------------------------------------------------------------------------


@pytest.fixture
def entry(tmp_path, ca) -> Enroller:
    return Enroller(ca, TokenStore(tmp_path / "data", ca.fingerprint))


def test_join_handshake_issues_a_cert_the_node_accepts(entry):
    token = entry.tokens.current("edge")
    key_pem, public_pem = new_tls_key()
    request = make_request(token, EN_KEY, public_pem, ["192.168.1.5"])
    ca_pem, cert_pem, reply_mac = entry.join(request)
    accept_reply(token, request, ca_pem, cert_pem, reply_mac)
    assert identity_of(cert_pem) == Identity("edge", EN_KEY.node_id, EN_KEY.public_hex)
    assert verify_issued(ca_pem, cert_pem) and ca_pem == entry.ca.cert_pem


def test_join_refuses_a_mac_made_with_another_secret(entry):
    token = entry.tokens.current("edge")
    forged = make_request(JoinToken.generate("edge", token.ca_fingerprint), EN_KEY, new_tls_key()[1], [])
    with pytest.raises(JoinRefused, match="MAC does not match"):
        entry.join(dataclasses.replace(forged, token_id=token.token_id))


def test_join_refuses_a_rotated_token(entry):
    token = entry.tokens.current("supernode")
    request = make_request(token, SN_KEY, new_tls_key()[1], [])
    entry.tokens.rotate("supernode")
    with pytest.raises(JoinRefused, match="^unknown or revoked join token; ask the operator for the current one$"):
        entry.join(request)


def test_join_refuses_an_edge_token_used_to_join_as_supernode(entry):
    request = make_request(entry.tokens.current("edge"), SN_KEY, new_tls_key()[1], [])
    with pytest.raises(JoinRefused, match="unknown or revoked join token"):
        entry.join(dataclasses.replace(request, role="supernode"))


@pytest.mark.parametrize("role", ["admin", "entry"])
def test_join_refuses_roles_only_the_operator_holds(entry, role):
    request = make_request(entry.tokens.current("supernode"), SN_KEY, new_tls_key()[1], [])
    with pytest.raises(JoinRefused, match="role must be supernode or edge"):
        entry.join(dataclasses.replace(request, role=role))


def test_join_refuses_hosts_changed_after_the_mac(entry):
    request = make_request(entry.tokens.current("edge"), EN_KEY, new_tls_key()[1], ["10.0.0.2"])
    with pytest.raises(JoinRefused, match="MAC does not match"):
        entry.join(dataclasses.replace(request, hosts=("evil.example",)))


def test_join_refuses_a_key_proof_by_another_key(entry):
    request = make_request(entry.tokens.current("edge"), EN_KEY, new_tls_key()[1], [])
    with pytest.raises(JoinRefused, match="key_proof is not a signature"):
        entry.join(dataclasses.replace(request, key_proof=SN_KEY.sign(request.message())))


def test_join_refuses_a_short_nonce(entry):
    request = make_request(entry.tokens.current("edge"), EN_KEY, new_tls_key()[1], [])
    with pytest.raises(JoinRefused, match="nonce must be 32 bytes"):
        entry.join(dataclasses.replace(request, nonce=b"short"))


def test_join_refusal_does_not_echo_a_huge_host(entry):
    request = make_request(entry.tokens.current("edge"), EN_KEY, new_tls_key()[1], [])
    with pytest.raises(JoinRefused) as refused:
        entry.join(dataclasses.replace(request, hosts=("x" * 100_000,)))
    assert len(str(refused.value)) < 200


def test_join_refuses_a_tls_key_that_is_not_p256(entry):
    pem = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(JoinRefused, match="P-256"):
        entry.join(make_request(entry.tokens.current("edge"), EN_KEY, pem, []))


def test_accept_reply_refuses_a_ca_that_is_not_pinned_even_with_a_leaked_secret(tmp_path, entry):
    token = entry.tokens.current("edge")
    request = make_request(token, EN_KEY, new_tls_key()[1], [])
    impostor = Enroller(CertificateAuthority.create(tmp_path / "impostor"), entry.tokens)
    with pytest.raises(PkiError, match="does not match the token's pin; check the token and the --entry address"):
        accept_reply(token, request, *impostor.join(request))


def test_accept_reply_refuses_a_reply_mac_that_does_not_match(entry):
    token = entry.tokens.current("edge")
    request = make_request(token, EN_KEY, new_tls_key()[1], [])
    ca_pem, cert_pem, reply_mac = entry.join(request)
    with pytest.raises(PkiError, match="reply MAC does not match"):
        accept_reply(token, request, ca_pem, cert_pem, bytes([reply_mac[0] ^ 1]) + reply_mac[1:])


def test_accept_reply_refuses_a_cert_for_another_node(entry):
    token = entry.tokens.current("edge")
    request = make_request(token, EN_KEY, new_tls_key()[1], [])
    ca_pem, cert_pem, _ = entry.join(make_request(token, SN_KEY, new_tls_key()[1], []))
    reply_mac = mac(token.secret, reply_message(request.nonce, ca_pem, cert_pem))
    with pytest.raises(PkiError, match="certificate for another identity"):
        accept_reply(token, request, ca_pem, cert_pem, reply_mac)


def test_accept_reply_refuses_a_cert_for_another_tls_key(entry):
    token = entry.tokens.current("edge")
    request = make_request(token, EN_KEY, new_tls_key()[1], [])
    ca_pem, cert_pem, _ = entry.join(make_request(token, EN_KEY, new_tls_key()[1], []))
    reply_mac = mac(token.secret, reply_message(request.nonce, ca_pem, cert_pem))
    with pytest.raises(PkiError, match="another TLS key"):
        accept_reply(token, request, ca_pem, cert_pem, reply_mac)


# --- mutual TLS through grpc -----------------------------------------------------------------------------------


def health_check(port: int, client: TlsCredentials | tuple[bytes, bytes, bytes]) -> int:
    ca_pem, key_pem, cert_pem = (client.ca_pem, client.key_pem, client.cert_pem) \
        if isinstance(client, TlsCredentials) else client
    credentials = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                             options=[("grpc.ssl_target_name_override", TLS_NAME)]) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return int(reply.status)


@pytest.fixture
def tls_server(tmp_path, ca):
    server_identity = issue_local(ca, tmp_path / "sn", "supernode", SN_KEY.node_id, SN_KEY.public_hex,
                                  ["127.0.0.1"])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    credentials = grpc.ssl_server_credentials([(server_identity.key_pem, server_identity.cert_pem)],
                                              root_certificates=ca.cert_pem, require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(None).wait()


def test_issued_certs_carry_a_mutual_tls_health_check_through_grpc(tmp_path, ca, tls_server):
    client = issue_local(ca, tmp_path / "en", "edge", EN_KEY.node_id, EN_KEY.public_hex)
    assert health_check(tls_server, client) == health_pb2.HealthCheckResponse.SERVING


def test_grpc_refuses_a_client_cert_from_another_ca(tmp_path, ca, tls_server):
    other = CertificateAuthority.create(tmp_path / "other")
    stranger = issue_local(other, tmp_path / "en", "edge", EN_KEY.node_id, EN_KEY.public_hex)
    with pytest.raises(grpc.RpcError):
        health_check(tls_server, (ca.cert_pem, stranger.key_pem, stranger.cert_pem))
