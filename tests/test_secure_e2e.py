"""Secure mode end to end with real processes: token joins of 3 super nodes and 4 edge nodes, a round, 2 of 3
validators stopped (no block becomes final, the head stays put) and back (training goes on), a validator removed
through a block, every chain verified by `main.py verify`; the console with and without the operator identity; the
open-mode warning and the non-loopback refusal."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from node.cli.cluster import NodeProcess, check_chains, start_node, stop_all, train, wait_for_members
from node.rpc.clients import AdminClient
from node.security.pki import TlsCredentials

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--model", "2nn", "--threads", "1", "--clients", "4", "--local-epochs", "1", "--reproducible",
          "--heartbeat", "0.5", "--dead-after", "5", "--retry-for", "0"]


def run_main(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def console(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    host, _, port = address.rpartition(":")
    return subprocess.run([sys.executable, str(ROOT / "console.py"), "--ip", host, "--port", port, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def wait_validators(entry: str, operator: TlsCredentials, count: int, timeout: float = 60) -> tuple[str, ...]:
    deadline = time.monotonic() + timeout
    validators: tuple[str, ...] = ()
    while time.monotonic() < deadline:
        with AdminClient(entry, security=operator) as admin:
            validators = tuple(admin.status().validators)
        if len(validators) == count:
            return validators
        time.sleep(0.3)
    raise AssertionError(f"the entry records {len(validators)} validators, expected {count}")


def test_a_secure_network_of_processes(tmp_path: Path) -> None:
    nodes: list[NodeProcess] = []
    try:
        entry_node = start_node("sn0", tmp_path / "sn0", ["--nt", "SN", "-z", "--port", "0", "--secure", *COMMON])
        nodes.append(entry_node)
        entry = entry_node.wait_ready(time.monotonic() + 120)
        info = entry_node.info
        assert info["secure"] and info["join_address"]
        operator = TlsCredentials.load(tmp_path / "sn0" / "admin")
        for name in ("join-sn.token", "join-en.token", "ca/ca.key", "tls/tls.key", "admin/tls.key"):
            assert (tmp_path / "sn0" / name).stat().st_mode & 0o077 == 0, name

        def supernode(name: str, *extra: str) -> NodeProcess:
            return start_node(name, tmp_path / name, ["--nt", "SN", "--port", "0", "--entry", entry,
                                                      "--join-address", info["join_address"], *COMMON, *extra])

        joins = ["--join", f"@{tmp_path / 'sn0' / 'join-sn.token'}"]
        sns = [supernode("sn1", *joins), supernode("sn2", *joins)]
        nodes += sns
        for node in sns:
            node.wait_ready(time.monotonic() + 120)
        wait_for_members(entry, 3, 0, 60, operator)
        validators = wait_validators(entry, operator, 3)
        edge_join = ["--join", f"@{tmp_path / 'sn0' / 'join-en.token'}", "--join-address", info["join_address"]]
        for first in (0, 2):
            node = start_node(f"en{first}", tmp_path / f"en{first}",
                              ["--nt", "EN", "--port", "0", "--entry", entry, "--partition-index", str(first),
                               "--partition-count", "4", "--hosted-edges", "2", *COMMON, *edge_join])
            nodes.append(node)
            node.wait_ready(time.monotonic() + 120)
        wait_for_members(entry, 3, 4, 60, operator)

        # a round, co-signed by a majority of the 3 validators
        lines = [line for line in train(entry, 1, lambda _l: None, operator) if line.finished]
        assert len(lines) == 1 and lines[0].participants == 4 and lines[0].failures == 0
        height, head = check_chains([n.address for n in [entry_node, *sns] if n.address], operator)

        # the console: refused without the operator identity, served with it
        refused = console(entry, "-c", "status()")
        assert refused.returncode == 2 and "secure mode" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        served = console(entry, "--identity", str(tmp_path / "sn0" / "admin"), "-c", "tokens(); status()")
        assert served.returncode == 0, served.stdout + served.stderr
        assert "fledger1-sn-" in served.stdout and "fledger1-en-" in served.stdout

        # 2 of 3 validators stop: no block becomes final and the head stays put
        stop_all(sns)
        failed = train(entry, 1, lambda _l: None, operator)
        assert not any(line.finished for line in failed), "a block became final with 1 of 3 validators"
        assert any("validators" in line.message for line in failed), [line.message for line in failed]
        with AdminClient(entry, security=operator) as admin:
            status = admin.status()
        assert status.head is not None and (status.head.height, status.head.hash) == (height, head)

        # they come back (their certificates are on disk: no token needed) and training goes on
        back = [supernode("sn1"), supernode("sn2")]
        nodes += back
        for node in back:
            node.wait_ready(time.monotonic() + 120)
        wait_for_members(entry, 3, 4, 60, operator)
        lines = [line for line in train(entry, 1, lambda _l: None, operator) if line.finished]
        assert len(lines) == 1 and lines[0].height > height

        # a validator removed through a membership block
        removed = validators[-1] if validators[-1] != info["node_id"] else validators[0]
        with AdminClient(entry, security=operator) as admin:
            result = admin.remove_supernode(removed)
        assert removed not in result.validators and len(result.validators) == 2
        wait_validators(entry, operator, 2)
    finally:
        stop_all(nodes)
    for name in ("sn0", "sn1", "sn2"):
        verified = run_main("verify", "--db", f"sqlite:///{tmp_path / name / 'ledger.db'}")
        assert verified.returncode == 0, verified.stdout + verified.stderr


def test_open_mode_warns_and_a_public_address_needs_a_mode(tmp_path: Path) -> None:
    node = start_node("open", tmp_path / "open", ["--nt", "SN", "-z", "--port", "0", *COMMON])
    try:
        node.wait_ready(time.monotonic() + 120)
        assert not node.info["secure"]
    finally:
        stop_all([node])
    log = (tmp_path / "open" / "node.log").read_text()
    assert sum("open mode" in line for line in log.splitlines()) == 1
    refused = run_main("node", "--data-root", str(tmp_path / "public"), "--nt", "SN", "-z", "--ip", "0.0.0.0",
                       "--advertise", "example.org:8080", "--port", "0", *COMMON)
    assert refused.returncode == 2
    assert "--secure" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_a_bad_token_is_refused_with_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = run_main("node", "--data-root", str(tmp_path / "x"), "--nt", "EN", "--port", "0", "--entry",
                   "127.0.0.1:9", "--join", "fledger1-en-not-a-token", *COMMON)
    assert bad.returncode == 2 and "join token" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
