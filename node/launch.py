"""Run one node process (SN or EN) from a Config until SIGINT/SIGTERM, then stop it cleanly."""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
from pathlib import Path

from config import Config

log = logging.getLogger(__name__)

READY_FILE = "node.json"


def _advertise_host(cfg: Config) -> str:
    """The host peers use: --advertise's host, else the bind address (never guessed from an outside host)."""
    if cfg.advertise:
        host, _, _port = cfg.advertise.rpartition(":")
        return host or cfg.advertise
    if cfg.ip in ("0.0.0.0", "::", ""):
        raise ValueError("binding all interfaces needs --advertise HOST:PORT so peers know where to reach this node")
    return cfg.ip


def build_node(cfg: Config):
    """The SuperNode or EdgeNode this Config describes (not started)."""
    from chain.keys import NodeKey
    from node.ledger import KEY_FILE, Ledger
    from node.setup import configure_torch

    listen = f"{cfg.ip}:{cfg.port}"
    host = _advertise_host(cfg)
    Path(cfg.data_root).mkdir(parents=True, exist_ok=True)
    if cfg.node_type == "SN":
        from node.supernode import SuperNode
        if not cfg.is_entry and not cfg.entry:
            raise ValueError("a super node needs --entry HOST:PORT, or -z to be the entry itself")
        configure_torch(cfg)
        ledger = Ledger.open(cfg.data_root, cfg.db)
        return SuperNode(ledger.key, ledger, listen, entry=None if cfg.is_entry else cfg.entry,
                         advertise_host=host, capacity=cfg.max_edges_per_sn, heartbeat_interval=cfg.heartbeat_s,
                         missed_beats=max(2, round(cfg.dead_after_s / cfg.heartbeat_s)), cfg=cfg)
    from node.edge import EdgeNode, edge_participant
    if not cfg.entry:
        raise ValueError("an edge node needs --entry HOST:PORT of the entry super node")
    device = configure_torch(cfg)
    key = NodeKey.load_or_create(Path(cfg.data_root) / KEY_FILE)
    participant = edge_participant(cfg, key.node_id, device=device)
    return EdgeNode(key, participant, listen, cfg.entry, advertise_host=host,
                    samples=participant.num_train_samples, heartbeat_interval=cfg.heartbeat_s,
                    partition_index=cfg.partition_index)


def write_ready(cfg: Config, node) -> None:
    """Tell whoever started us (the cluster command, a test) where we serve: DATA_ROOT/node.json, atomically."""
    info = {"address": node.address, "node_id": node.key.node_id, "type": cfg.node_type,
            "entry": cfg.is_entry, "pid": os.getpid()}
    path = Path(cfg.data_root) / READY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)


def run_node(cfg: Config) -> int:
    node = build_node(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    node.start()
    write_ready(cfg, node)
    role = "entry super node" if cfg.node_type == "SN" and cfg.is_entry else \
        "super node" if cfg.node_type == "SN" else "edge node"
    print(f"{role} {node.key.node_id} serving on {node.address}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        print("stopping", flush=True)
        node.stop()
        ledger = getattr(node, "ledger", None)
        if ledger is not None:
            ledger.close()
        (Path(cfg.data_root) / READY_FILE).unlink(missing_ok=True)
    return 0
