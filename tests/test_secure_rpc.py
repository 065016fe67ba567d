"""Secure mode over real mutual TLS on loopback: every RPC of every service against a caller with no certificate, a
certificate from another CA, a valid certificate of the wrong role, and the right role; joining by token; a node
speaking only for itself."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import grpc
import pytest

from chain.keys import NodeKey
from config import Config, ConfigError
from conftest import wait_until
from network import BEAT, MISSED_BEATS, config
from node.engine.edge import EdgeCore
from node.ledger import Ledger
from node.process.edge import EdgeNode
from node.process.secure import entry_security, joined_credentials
from node.process.supernode import SuperNode
from node.rpc import transport
from node.rpc.clients import AdminClient
from node.rpc.security import RULES
from node.run import configure_torch, edge_cores
from node.security.pki import CertificateAuthority, TlsCredentials, issue_local
from proto import fledger_pb2

SERVICES = ("Registry", "SuperNode", "Admin", "EdgeNode")
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclasses.dataclass
class SecureNet:
    entry: SuperNode
    edge: EdgeNode
    ca: CertificateAuthority
    clients: dict[str, TlsCredentials]     # role -> a certificate of that role from the network's CA
    foreign: TlsCredentials                # a supernode certificate from another CA
    root: Path

    def close(self) -> None:
        self.edge.stop(None)
        self.entry.stop(None)


@pytest.fixture(scope="module")
def net(tmp_path_factory) -> Any:
    root = tmp_path_factory.mktemp("secure")
    cfg = dataclasses.replace(config(root / "entry"), clients=1, partition_count=1)
    configure_torch(cfg)
    key = NodeKey.from_seed(b"entry")
    parts = entry_security(root / "entry", key, ["127.0.0.1"])
    ledger = Ledger.open(root / "entry", key=key)
    entry = SuperNode(ledger, "127.0.0.1:0", dataclasses.replace(cfg, is_entry=True), heartbeat_interval=BEAT,
                      missed_beats=MISSED_BEATS, genesis=False, entry_security=parts, join_listen="127.0.0.1:0")
    entry.start()
    edge_key = NodeKey.from_seed(b"edge0")
    join = dataclasses.replace(cfg, entry=entry.address, join=parts.tokens.current("edge").text,
                               join_address=f"127.0.0.1:{entry.join_port}")
    creds = joined_credentials(root / "edge0", edge_key, "edge", join, ["127.0.0.1"])
    cores, _, _ = edge_cores(cfg, [edge_key], 0, 1)
    edge = EdgeNode(EdgeCore(cores[0].participant, edge_key, share=0), "127.0.0.1:0", entry.address,
                    heartbeat_interval=BEAT, security=creds)
    edge.start()
    clients = {"entry": parts.credentials, "edge": creds}
    for role in ("supernode",):
        k = NodeKey.from_seed(f"client-{role}".encode())
        clients[role] = issue_local(parts.ca, root / f"client-{role}", role, k.node_id, k.public_hex)
    clients["admin"] = TlsCredentials.load(root / "entry" / "admin")
    other_ca = CertificateAuthority.create(root / "other-ca")
    k = NodeKey.from_seed(b"foreign")
    foreign = issue_local(other_ca, root / "foreign", "supernode", k.node_id, k.public_hex)
    network = SecureNet(entry, edge, parts.ca, clients, foreign, root)
    assert wait_until(lambda: len(entry.edges) == 1, timeout=15.0), "the edge node did not join"
    yield network
    network.close()


def methods() -> list[tuple[str, str, Any]]:
    """(service, method, descriptor) of every RPC the node services define."""
    out = []
    for service in SERVICES:
        desc = fledger_pb2.DESCRIPTOR.services_by_name[service]
        out += [(service, m.name, m) for m in desc.methods]
    return out


def request_for(service: str, method: str, creds: TlsCredentials | None) -> bytes:
    """A request that passes the field checks of a caller speaking for itself (its node id and key), serialized."""
    ident = creds.identity if creds is not None else None
    node_id = ident.node_id if ident else "0" * 32
    public_key = ident.public_key if ident else "0" * 64
    if method in ("RegisterSuperNode", "AssignSuperNode", "RegisterEdge"):
        msg: Any = fledger_pb2.NodeInfo(node_id=node_id, public_key=public_key, address="127.0.0.1:9")
    elif method in ("Heartbeat", "EdgeHeartbeat"):
        msg = fledger_pb2.HeartbeatRequest(node_id=node_id)
    elif method == "AnnounceRound":
        msg = fledger_pb2.RoundAnnouncement(round=1, proposer_id=node_id)
    elif method == "Promise":
        msg = fledger_pb2.PromiseRequest(view=0, candidate_id=node_id)
    elif method == "RotateToken":
        msg = fledger_pb2.RotateRequest(role="edge")
    else:
        msg = fledger_pb2.Empty()
    return bytes(msg.SerializeToString())


def call(address: str, creds: TlsCredentials | None, service: str, method: Any) -> grpc.StatusCode:
    """The status one call ends with (OK or the error's code); streams are read to the end."""
    path = f"/fledger.v1.{service}/{method.name}"
    payload = request_for(service, method.name, creds)
    channel = transport.open_channel(address, creds)
    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(path)(iter([]), timeout=5)
            list(stream)
        elif method.client_streaming:
            channel.stream_unary(path)(iter([]), timeout=5)
        elif method.server_streaming:
            list(channel.unary_stream(path)(payload, timeout=5))
        else:
            channel.unary_unary(path)(payload, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def address_of(net: SecureNet, service: str) -> str:
    return net.edge.address if service == "EdgeNode" else net.entry.address


@pytest.mark.parametrize("service, name, method", methods(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_rpc_is_for_its_roles_only(net: SecureNet, service: str, name: str, method: Any) -> None:
    allowed = RULES[f"/fledger.v1.{service}/{name}"]
    address = address_of(net, service)
    # No certificate, or one from another CA: the TLS handshake refuses the connection before any RPC runs.
    assert call(address, None, service, method) == grpc.StatusCode.UNAVAILABLE
    assert call(address, net.foreign, service, method) == grpc.StatusCode.UNAVAILABLE
    for role, creds in net.clients.items():
        code = call(address, creds, service, method)
        if role in allowed:
            assert code not in (*DENIED, grpc.StatusCode.UNAVAILABLE), (role, code)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, (role, code)


def test_the_rule_table_covers_every_rpc_and_nothing_else() -> None:
    names = {f"/fledger.v1.{s}/{n}" for s, n, _ in methods()}
    assert names == set(RULES)


def test_the_join_port_serves_only_joining(net: SecureNet) -> None:
    join = f"127.0.0.1:{net.entry.join_port}"
    for service, name, method in methods():
        if service == "EdgeNode":
            continue
        assert call(join, None, service, method) == grpc.StatusCode.UNAUTHENTICATED, name


def test_a_node_speaks_only_for_itself(net: SecureNet) -> None:
    """A valid super node certificate cannot register or heartbeat under another node's id."""
    other = NodeKey.from_seed(b"victim")
    with transport.open_channel(net.entry.address, net.clients["supernode"]) as channel:
        stub = fledger_pb2_grpc_stub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterSuperNode(fledger_pb2.NodeInfo(node_id=other.node_id, public_key=other.public_hex,
                                                        address="127.0.0.1:9"), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as err:
            stub.Heartbeat(fledger_pb2.HeartbeatRequest(node_id=net.entry.key.node_id), timeout=5)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def fledger_pb2_grpc_stub(channel: grpc.Channel) -> Any:
    from proto import fledger_pb2_grpc
    return fledger_pb2_grpc.RegistryStub(channel)


def test_a_bad_or_revoked_token_is_refused_with_one_line(net: SecureNet, tmp_path: Path) -> None:
    parts_tokens = net.entry.entry_security.tokens   # type: ignore[union-attr]
    old = parts_tokens.current("supernode").text
    cfg = Config(entry=net.entry.address, join_address=f"127.0.0.1:{net.entry.join_port}")
    key = NodeKey.from_seed(b"late")
    with pytest.raises(ConfigError, match="not a fledger join token"):
        joined_credentials(tmp_path / "a", key, "supernode", dataclasses.replace(cfg, join="nonsense"), [])
    with pytest.raises(ConfigError, match="given a supernode token"):
        joined_credentials(tmp_path / "b", key, "edge", dataclasses.replace(cfg, join=old), [])
    with AdminClient(net.entry.address, security=net.clients["admin"]) as admin:
        rotated = admin.rotate_token("supernode")["supernode"]
    assert rotated != old
    with pytest.raises(ConfigError, match="unknown or revoked join token") as err:
        joined_credentials(tmp_path / "c", key, "supernode", dataclasses.replace(cfg, join=old), [])
    assert "\n" not in str(err.value)
    creds = joined_credentials(tmp_path / "d", key, "supernode", dataclasses.replace(cfg, join=rotated), [])
    assert creds.identity.role == "supernode" and creds.identity.node_id == key.node_id
    assert not (tmp_path / "c" / "tls").exists()


def test_the_operator_reads_the_tokens_and_status(net: SecureNet) -> None:
    with AdminClient(net.entry.address, security=net.clients["admin"]) as admin:
        tokens = admin.tokens()
        assert tokens["edge"].startswith("fledger1-en-") and tokens["supernode"].startswith("fledger1-sn-")
        assert admin.status().node_id == net.entry.key.node_id


def test_the_mode_follows_flags_the_bind_address_and_what_is_on_disk(tmp_path: Path) -> None:
    from node.process.secure import wants_secure

    assert not wants_secure(Config(), tmp_path)                                  # loopback: open by default
    assert wants_secure(Config(secure=True), tmp_path)
    assert wants_secure(Config(join="@token"), tmp_path)                         # joining implies secure
    with pytest.raises(ConfigError, match="--insecure"):
        wants_secure(Config(ip="0.0.0.0"), tmp_path)
    assert not wants_secure(Config(ip="0.0.0.0", insecure=True), tmp_path)
    with pytest.raises(ConfigError, match="contradict"):
        wants_secure(Config(secure=True, insecure=True), tmp_path)
    (tmp_path / "edge-3" / "tls").mkdir(parents=True)                          # an edge host that joined before
    assert wants_secure(Config(), tmp_path)
