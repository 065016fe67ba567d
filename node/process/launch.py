"""Run one node process (SN or EN) from a Config until SIGINT/SIGTERM, then stop it cleanly."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from chain.private import private_dir
from config import Config, ConfigError
from node.process import PARENT_ENV, READY_FILE
from node.process.edge import EdgeHost, EdgeNode
from node.process.secure import OPEN_MODE_WARNING
from node.process.supernode import SuperNode
from node.security.pki import TlsCredentials


def _advertise(cfg: Config) -> tuple[str, int | None]:
    """(host, port) peers use: --advertise's, else the bind address and the bound port (port None). Never guessed
    by contacting an outside host. The port matters behind port mapping (docker -p 9000:8080)."""
    if cfg.advertise:
        host, _, port = cfg.advertise.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ConfigError(f"--advertise must be HOST:PORT, got {cfg.advertise!r}")
        return host, int(port)
    if cfg.ip in ("0.0.0.0", "::", ""):
        raise ConfigError("binding all interfaces needs --advertise HOST:PORT so peers know where to reach this node")
    return cfg.ip, None


def build_node(cfg: Config) -> SuperNode | EdgeNode | EdgeHost:
    """The super node or edge node(s) this Config describes (not started)."""
    from chain.keys import NodeKey
    from node.engine.edge import PERSONAL_FILE, restore_personal
    from node.ledger import KEY_FILE, Ledger
    from node.process.secure import entry_security, join_port_address, joined_credentials, wants_secure
    from node.run import configure_torch, edge_cores

    listen = f"{cfg.ip}:{cfg.port}"
    host, advertised_port = _advertise(cfg)
    private_dir(cfg.data_root)
    secure = wants_secure(cfg, Path(cfg.data_root))
    hosts = sorted({host, cfg.ip} - {"0.0.0.0", "::", ""})
    if cfg.node_type == "SN":
        if not cfg.is_entry and not cfg.entry:
            raise ConfigError("a super node needs --entry HOST:PORT, or -z to be the entry itself")
        configure_torch(cfg)
        key = NodeKey.load_or_create(Path(cfg.data_root) / KEY_FILE)
        entry_parts = credentials = None
        if secure and cfg.is_entry:
            entry_parts = entry_security(Path(cfg.data_root), key, hosts)
        elif secure:
            credentials = joined_credentials(Path(cfg.data_root), key, "supernode", cfg, hosts)
        ledger = Ledger.open(cfg.data_root, cfg.db)
        return SuperNode(ledger, listen, cfg, entry=None if cfg.is_entry else cfg.entry, advertise_host=host,
                         advertise_port=advertised_port, capacity=cfg.max_edges_per_sn,
                         heartbeat_interval=cfg.heartbeat_s,
                         missed_beats=max(2, round(cfg.dead_after_s / cfg.heartbeat_s)),
                         security=credentials, entry_security=entry_parts,
                         join_listen=join_port_address(cfg, host) if entry_parts is not None else None)
    if not cfg.entry:
        raise ConfigError("an edge node needs --entry HOST:PORT of the entry super node")
    device = configure_torch(cfg)
    shares = range(cfg.partition_index, cfg.partition_index + cfg.hosted_edges)
    # One edge node keeps the data root itself; a host gives each of its nodes DATA_ROOT/edge-<share>.
    roots = [Path(cfg.data_root)] if cfg.hosted_edges == 1 else [Path(cfg.data_root) / f"edge-{i}" for i in shares]
    keys: list[NodeKey] = []
    hosted: list[TlsCredentials | None] = []
    for root in roots:
        private_dir(root)
        keys.append(NodeKey.load_or_create(root / KEY_FILE))
        hosted.append(joined_credentials(root, keys[-1], "edge", cfg, hosts) if secure else None)
    cores, _, _ = edge_cores(cfg, keys, cfg.partition_index, cfg.partition_count, device=device)
    nodes = []
    for i, (root, core) in enumerate(zip(roots, cores, strict=True)):
        restore_personal(core.participant, root / PERSONAL_FILE)
        core.personal_file = root / PERSONAL_FILE
        port = cfg.port + i if cfg.port else 0
        nodes.append(EdgeNode(core, f"{cfg.ip}:{port}", cfg.entry, advertise_host=host,
                              advertise_port=advertised_port + i if advertised_port else None,
                              heartbeat_interval=cfg.heartbeat_s, security=hosted[i]))
    return nodes[0] if len(nodes) == 1 else EdgeHost(nodes)


def write_ready(cfg: Config, node: SuperNode | EdgeNode | EdgeHost) -> None:
    """Tell whoever started us (the cluster command, a test) where we serve: DATA_ROOT/node.json, atomically."""
    addresses = node.addresses if isinstance(node, EdgeHost) else [node.address]
    info = {"address": node.address, "node_id": node.key.node_id, "type": cfg.node_type,
            "entry": cfg.is_entry, "pid": os.getpid(), "addresses": addresses,
            "secure": node.nodes[0].security is not None if isinstance(node, EdgeHost) else node.security is not None}
    if isinstance(node, SuperNode) and node.join_port is not None:
        info["join_address"] = f"{node.address.rpartition(':')[0]}:{node.join_port}"
    path = Path(cfg.data_root) / READY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def die_with_parent() -> None:
    """When started by a parent that asked (PARENT_ENV), get SIGTERM once it dies (Linux), and stop at once if it
    already has."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not parent.isdigit():
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):   # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_node(cfg: Config) -> int:
    die_with_parent()
    node = build_node(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    write_ready(cfg, node)
    role = "entry super node" if cfg.node_type == "SN" and cfg.is_entry else \
        "super node" if cfg.node_type == "SN" else "edge node"
    nodes = node.nodes if isinstance(node, EdgeHost) else [node]
    for n in nodes:
        print(f"{role} {n.key.node_id} serving on {n.address}", flush=True)
    if nodes[0].security is None:
        print(OPEN_MODE_WARNING.format(address=nodes[0].address), file=sys.stderr, flush=True)
    elif isinstance(node, SuperNode) and node.join_port is not None:
        print(f"secure mode: joins on port {node.join_port}; tokens in {Path(cfg.data_root).resolve()}/join-*.token, "
              f"operator identity in {Path(cfg.data_root).resolve()}/admin", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping", flush=True)
        node.stop()
        if isinstance(node, SuperNode):
            node.ledger.close()
        (Path(cfg.data_root) / READY_FILE).unlink(missing_ok=True)
    return 0
