"""Run one node process (SN or EN) from a Config until SIGINT/SIGTERM, then stop it cleanly."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from chain.private import private_dir
from config import Config, ConfigError
from node.process import PARENT_ENV, READY_FILE
from node.process.edge import EdgeHost, EdgeNode
from node.process.secure import OPEN_MODE_WARNING
from node.process.supernode import SuperNode
from node.security.pki import TlsCredentials

if TYPE_CHECKING:
    from fl.data import Dataset
    from fl.local import Workbench
    from node.engine.pacing import Pacer

log = logging.getLogger(__name__)

# A stopping node leaves after this long at most, even in the middle of a round (SuperNode.stop lets the current
# round finish: up to a minute); one its parent started (PARENT_ENV) sooner: the cluster kills what outlives its
# own 10 s grace, and an orphan has nobody to kill it.
STOP_LIMIT_S = 90.0
CHILD_STOP_LIMIT_S = 10.0
PARENT_POLL_S = 1.0   # how often a node started by a parent checks that it still lives


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
    cores, bench, dataset = edge_cores(cfg, keys, cfg.partition_index, cfg.partition_count, device=device)
    pacer = edge_pacer(cfg, bench, dataset)
    nodes = []
    for i, (root, core) in enumerate(zip(roots, cores, strict=True)):
        restore_personal(core.participant, root / PERSONAL_FILE)
        core.personal_file = root / PERSONAL_FILE
        port = cfg.port + i if cfg.port else 0
        nodes.append(EdgeNode(core, f"{cfg.ip}:{port}", cfg.entry, advertise_host=host,
                              advertise_port=advertised_port + i if advertised_port else None,
                              heartbeat_interval=cfg.heartbeat_s, security=hosted[i], pacer=pacer))
    return nodes[0] if len(nodes) == 1 else EdgeHost(nodes)


def edge_pacer(cfg: Config, bench: Workbench, dataset: Dataset) -> Pacer | None:
    """Under a scenario, what makes this process's edge nodes spend their profiles' time (node.engine.pacing), on
    the virtual clock the proposer plans with (the run's context, over this process's dataset and model)."""
    if cfg.scenario is None:
        return None
    from fl.cost import measure_gflops
    from node.engine.pacing import Pacer
    from node.run import RunContext
    ctx = RunContext(cfg, dataset=dataset, workbench=bench)
    assert ctx.scenario is not None
    last = cfg.partition_index + cfg.hosted_edges - 1
    if last >= ctx.scenario.edge_nodes:
        raise ConfigError(f"edge share {last} has no profile: the scenario {cfg.scenario} describes edge nodes "
                          f"0..{ctx.scenario.edge_nodes - 1}")
    if ctx.scenario.needs_host_rate and ctx.scenario.host_gflops is None:
        log.warning("the scenario's devices are relative to this machine and neither it nor --host-gflops pins its "
                    "rate: measured %.2f GFLOP/s here; pin it so every node and the simulator time alike",
                    ctx.host_gflops())
    else:   # a first training pays one-off costs (allocations, kernel choice) that no device profile has
        with bench.lock:
            measure_gflops(bench.model, dataset.input_shape, dataset.num_classes, cfg.batch_size, batches=2,
                           repeats=1)
    clock = ctx.clock()
    assert clock is not None
    return Pacer(clock, cfg.shape_links)


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


def expected_parent() -> int | None:
    """The pid of the process that started this node and asked it to die with it (PARENT_ENV), if any."""
    parent = os.environ.get(PARENT_ENV, "")
    return int(parent) if parent.isdigit() else None


def die_with_parent(stopping: threading.Event) -> None:
    """When started by a parent that asked (PARENT_ENV), get SIGTERM once it dies (Linux), and exit at once if it
    already has. A thread also polls the parent and sends the SIGTERM itself unless ``stopping`` is set, in case
    the kernel request is unavailable or did not fire (it follows the parent thread that started us)."""
    parent = expected_parent()
    if parent is None:
        return
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:   # PR_SET_PDEATHSIG
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the parent instead", ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        log.warning("no prctl (%s); polling the parent instead", exc)
    if os.getppid() != parent:   # the parent died before the request took effect: nothing started yet
        print(f"the parent process {parent} is gone; not starting", file=sys.stderr, flush=True)
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent, stopping), name="parent-watch", daemon=True).start()


def _watch_parent(parent: int, stopping: threading.Event) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    if not stopping.is_set():
        log.warning("the parent process %d is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)


def _exit_within(seconds: float, state: dict[str, bool]) -> None:
    """Leave the process after ``seconds`` however far the stop got: a round, a retry or a non-daemon thread (a
    gRPC handler still training) must not keep a stopped node alive."""
    def expire() -> None:
        time.sleep(seconds)
        log.error("the node did not stop within %.0f s; exiting anyway", seconds)
        sys.stderr.flush()
        os._exit(0 if state["clean"] else 1)
    threading.Thread(target=expire, name="stop-deadline", daemon=True).start()


def _stop_steps(steps: list[tuple[str, Callable[[], object]]]) -> bool:
    """Run every stop step, each in a ``finally`` of the one before, so that none is skipped; a failure is logged
    in one line (the node still exits 0). True when all succeeded."""
    if not steps:
        return True
    (what, step), ok = steps[0], False
    try:
        step()
        ok = True
    except Exception as exc:
        log.error("%s failed: %s: %s", what, type(exc).__name__, str(exc).replace("\n", " "))
    finally:
        ok = _stop_steps(steps[1:]) and ok
    return ok


def run_node(cfg: Config) -> int:
    stop = threading.Event()
    die_with_parent(stop)   # first: until the handlers below are set, SIGTERM ends the process at once
    node = build_node(cfg)
    state = {"clean": False}

    # The handler only appends to a list. It runs between two bytecodes of the main thread, which may then hold
    # any lock: setting the Event from here deadlocked when a signal came while the main thread was inside
    # Event.wait holding the Event's own lock, and the node outlived its parent (seen once in CI).
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signals and signum == signal.SIGINT:   # Ctrl-C twice: leave now
            os._exit(128 + signum)
        signals.append(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
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
            print(f"secure mode: joins on port {node.join_port}; tokens in {Path(cfg.data_root).resolve()}/"
                  f"join-*.token, operator identity in {Path(cfg.data_root).resolve()}/admin", flush=True)
        while not signals:
            time.sleep(0.5)   # a signal interrupts the sleep, runs the handler, and the sleep goes on to its end
    finally:
        stop.set()   # from the main thread: the parent watchdog sees that the node is stopping
        print("stopping", flush=True)
        _exit_within(STOP_LIMIT_S if expected_parent() is None else CHILD_STOP_LIMIT_S, state)
        ready = Path(cfg.data_root) / READY_FILE
        steps: list[tuple[str, Callable[[], object]]] = [("stopping the node", node.stop)]
        if isinstance(node, SuperNode):
            steps.append(("closing the ledger", node.ledger.close))
        steps.append((f"removing {ready}", lambda: ready.unlink(missing_ok=True)))
        state["clean"] = _stop_steps(steps)
    return 0
