"""End to end with real processes: `main.py cluster`, docker-compose.yml's services run as local processes, and
the Dockerfile's HEALTHCHECK command against a real node."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import mysql_admin_execute, mysql_server_url
from node.cli.cluster import check_chains, start_node, stop_all, train, wait_for_members
from node.security.pki import TlsCredentials

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

pytestmark = pytest.mark.slow


def test_cluster_command_trains_and_every_chain_verifies_with_equal_heads(tmp_path):
    proc = subprocess.run([sys.executable, "main.py", "cluster", "--sn", "2", "--en", "4", "--rounds", "2",
                           "--model", "2nn", "--en-per-process", "2", "--data-root", str(tmp_path), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)

    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["head_height"] == 3   # the block that admitted the second super node as a validator, 2 rounds
    assert "all 2 chains verify" in proc.stdout
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "node processes outlived the cluster command"


def model_hashes(db: Path) -> list[str]:
    """The model of every block but the membership blocks (which keep the model): one per round."""
    from chain.validators import is_membership
    from storage.store import LedgerStore
    store = LedgerStore(f"sqlite:///{db}")
    try:
        headers = [store.get_block(h)[0].header for h in range(store.count())]
        return [header.model_hash for header in headers if not is_membership(header)]
    finally:
        store.close()


def test_cluster_and_simulate_with_two_super_nodes_give_the_same_model_in_every_block(tmp_path):
    common = ["--rounds", "2", "--model", "2nn", "--seed", "5", "--reproducible"]
    cluster = subprocess.run([sys.executable, "main.py", "cluster", "--sn", "2", "--en", "4", *common,
                              "--data-root", str(tmp_path / "net")],   # each node: one torch thread
                             cwd=ROOT, capture_output=True, text=True, timeout=400)
    simulate = subprocess.run([sys.executable, "main.py", "simulate", "--sn", "2", "--clients", "4", *common,
                               "--threads", "1", "--no-progress", "--data-root", str(tmp_path / "sim")],
                              cwd=ROOT, capture_output=True, text=True, timeout=400)

    assert cluster.returncode == 0, cluster.stdout[-3000:] + cluster.stderr[-3000:]
    assert simulate.returncode == 0, simulate.stdout[-3000:] + simulate.stderr[-3000:]
    net = model_hashes(tmp_path / "net" / "cluster" / "sn0" / "ledger.db")
    assert len(net) == 3
    assert net == model_hashes(tmp_path / "net" / "cluster" / "sn1" / "ledger.db")
    assert net == model_hashes(tmp_path / "sim" / "ledger.db") == model_hashes(tmp_path / "sim" / "sn1" / "ledger.db")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_declares_mysql_two_supernodes_and_four_edge_nodes_with_distinct_shards():
    services = compose()["services"]
    mysql = services["mysql"]
    assert mysql["image"].startswith("mysql:8")
    assert "healthcheck" in mysql and any("mysql-data" in v for v in mysql["volumes"])
    supernodes = {k: v for k, v in services.items() if v.get("environment", {}).get("FLEDGER_NODE_TYPE") == "SN"}
    edges = {k: v for k, v in services.items() if v.get("environment", {}).get("FLEDGER_NODE_TYPE") == "EN"}
    assert len(supernodes) == 2 and len(edges) >= 4
    assert sum(v["environment"].get("FLEDGER_IS_ENTRY") == "true" for v in supernodes.values()) == 1
    assert len({v["environment"]["FLEDGER_DB"] for v in supernodes.values()}) == 2
    assert len({v["environment"]["FLEDGER_PARTITION_INDEX"] for v in edges.values()}) == len(edges)
    assert all(v["build"] == "." for v in [*supernodes.values(), *edges.values()])
    # edge nodes start once every super node serves, so edge i goes to super node i mod K as in `simulate --sn K`
    assert all({k: d["condition"] for k, d in v["depends_on"].items()} == dict.fromkeys(supernodes, "service_healthy")
               for v in edges.values())


def local_env(env: dict, run_id: str, server, entry_root: Path | None = None) -> dict[str, str]:
    """A service's environment with container names swapped for loopback, the local MariaDB, and the entry's data
    volume (mounted at /entry in the containers) for the entry's data root."""
    out = {k: str(v) for k, v in env.items()}
    if entry_root is not None and out.get("FLEDGER_JOIN", "").startswith("@/entry/"):
        out["FLEDGER_JOIN"] = "@" + str(entry_root / out["FLEDGER_JOIN"][len("@/entry/"):])
    out.update(FLEDGER_IP="127.0.0.1", FLEDGER_PORT="0", FLEDGER_THREADS="1", FLEDGER_MODEL="2nn")
    out.pop("FLEDGER_ADVERTISE", None)
    if "FLEDGER_DB" in out:
        out["FLEDGER_DB"] = server.set(database=f"{database(env)}_{run_id}").render_as_string(hide_password=False)
    return out


def database(env: dict) -> str:
    """The database a super node's FLEDGER_DB names."""
    return env["FLEDGER_DB"].split("/")[-1].split("?")[0]


@pytest.mark.mysql
def test_compose_services_run_as_local_processes_and_complete_a_round(tmp_path):
    server = mysql_server_url()     # skips visibly, or fails when FLEDGER_REQUIRE_MYSQL=1
    services = compose()["services"]
    run_id = uuid.uuid4().hex[:8]
    nodes = {k: v for k, v in services.items() if k != "mysql"}
    supernodes = sorted((k for k, v in nodes.items() if v["environment"]["FLEDGER_NODE_TYPE"] == "SN"),
                        key=lambda k: (nodes[k]["environment"].get("FLEDGER_IS_ENTRY") != "true", k))
    edges = sorted(k for k in nodes if k not in supernodes)
    started = []

    def start(name: str, entry: str | None):  # noqa: ANN202
        svc = nodes[name]
        assert svc["command"][:2] == ["python", "main.py"]
        env = local_env(svc["environment"], run_id, server, tmp_path / supernodes[0])
        if entry:
            env["FLEDGER_ENTRY"] = entry
            env["FLEDGER_JOIN_ADDRESS"] = started[0].info["join_address"]   # compose: the entry's port + 1
        node = start_node(name, tmp_path / name, svc["command"][3:], env)
        started.append(node)
        return node

    try:
        entry = start(supernodes[0], None).wait_ready(time.monotonic() + 120)
        assert started[0].info["secure"], "compose runs the network in secure mode"
        operator = TlsCredentials.load(tmp_path / supernodes[0] / "admin")
        sns = [started[0], *(start(name, entry) for name in supernodes[1:])]
        for node in sns:
            node.wait_ready(time.monotonic() + 120)
        # as `main.py cluster` does: every super node has joined before the first edge node asks for one
        wait_for_members(entry, len(sns), 0, 120, operator)
        for node in [start(name, entry) for name in edges]:
            node.wait_ready(time.monotonic() + 120)
        wait_for_members(entry, len(sns), len(edges), 120, operator)
        progress = train(entry, 1, lambda _line: None, operator)
        height, _head = check_chains([n.address for n in sns], operator)
    finally:
        stop_all(started)
        mysql_admin_execute(server, *(f"DROP DATABASE IF EXISTS `{database(nodes[n]['environment'])}_{run_id}`"
                                      for n in supernodes))
    assert height == 2   # the block that admitted the second super node as a validator, then round 1
    assert any(p.block_hash for p in progress)


# ---------------------------------------------------------------- the Dockerfile's HEALTHCHECK

def healthcheck_command() -> list[str]:
    """The exec-form CMD of the Dockerfile's HEALTHCHECK line."""
    line = next(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("HEALTHCHECK"))
    return json.loads(line.split(" CMD ", 1)[1])


def test_dockerfile_healthcheck_runs_a_module_that_imports_and_is_copied_into_the_image():
    command = healthcheck_command()
    assert command[:2] == ["python", "-m"]
    module = importlib.import_module(command[2])
    assert callable(module.main)
    package = command[2].split(".")[0]
    assert f"COPY {package} ./{package}" in DOCKERFILE.read_text()


def test_dockerfile_healthcheck_probes_the_port_compose_gives_every_node():
    port = compose()["x-node"]["environment"]["FLEDGER_PORT"]

    assert healthcheck_command()[-1] == f"127.0.0.1:{port}"


def test_dockerfile_healthcheck_exits_0_for_a_serving_node_and_1_once_it_stopped(tmp_path):
    command = [sys.executable, *healthcheck_command()[1:-1]]
    node = start_node("sn0", tmp_path / "sn0", ["--nt", "SN", "-z", "--port", "0", "--model", "2nn",
                                                "--threads", "1"])
    try:
        address = node.wait_ready(time.monotonic() + 120)
        serving = subprocess.run([*command, address], cwd=ROOT, capture_output=True, text=True, timeout=60)
    finally:
        stop_all([node])
    stopped = subprocess.run([*command, address], cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert serving.returncode == 0, serving.stdout + serving.stderr
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
