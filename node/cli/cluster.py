"""`main.py cluster`: start SNs and ENs as local processes on loopback, train, check every chain, shut down."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config import Config
from node.engine.errors import NetError
from node.process import PARENT_ENV, READY_FILE
from node.rpc.clients import AdminClient, RoundLine
from node.security.pki import TlsCredentials

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]   # the repository: node/cli/cluster.py -> main.py beside node/


class ClusterError(RuntimeError):
    """The cluster did not come up, train or agree; the message says which node and why."""


@dataclass
class NodeProcess:
    name: str
    data_root: Path
    popen: subprocess.Popen
    address: str | None = None
    info: dict = field(default_factory=dict)

    def wait_ready(self, deadline: float) -> str:
        ready = self.data_root / READY_FILE
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise ClusterError(f"{self.name} exited with code {self.popen.returncode}; "
                                   f"see {self.data_root / 'node.log'}:\n{_tail(self.data_root / 'node.log')}")
            if ready.exists():
                try:
                    self.info = json.loads(ready.read_text())
                    self.address = self.info["address"]
                    return self.address
                except (ValueError, KeyError):
                    pass    # half-written: try again
            time.sleep(0.1)
        raise ClusterError(f"{self.name} did not start within the time limit; see {self.data_root / 'node.log'}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


def start_node(name: str, data_root: Path, args: Sequence[str], env: dict[str, str] | None = None) -> NodeProcess:
    """Start ``python main.py node ARGS`` with its own data root; output goes to DATA_ROOT/node.log."""
    data_root.mkdir(parents=True, exist_ok=True)
    (data_root / READY_FILE).unlink(missing_ok=True)
    log_file = open(data_root / "node.log", "ab")
    cmd = [sys.executable, str(ROOT / "main.py"), "node", "--data-root", str(data_root), *args]
    # No preexec_fn: Python code between fork and exec in this process, whose gRPC threads are running, let gRPC's
    # fork handlers restart a poller that close_fds then broke (the child aborted, "epoll_wait error: Bad file
    # descriptor"). The node asks for SIGTERM on this process's death itself (PARENT_ENV, see run_node).
    popen = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {}), PARENT_ENV: str(os.getpid())},
                             start_new_session=True)
    log_file.close()
    return NodeProcess(name, data_root, popen)


class StopSignals:
    """While installed (main thread only; elsewhere no handler runs): SIGINT raises KeyboardInterrupt and SIGTERM
    SystemExit(143), so the command's ``finally`` stops every node (SIGTERM would otherwise end this process at
    once, leaving the nodes to notice their parent is gone); once ``stopping`` is set, both are only noted, so a
    second one cannot cut the stop short and leave a node behind."""

    def __init__(self) -> None:
        self.stopping = False
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.stopping:
            log.warning("signal %d while stopping the nodes; still stopping them", signum)
            return
        self.stopping = True   # raise once only
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def stop_all(nodes: Sequence[NodeProcess], grace: float = 10.0) -> None:
    """SIGTERM every node, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for node in nodes:
        if node.popen.poll() is None:
            node.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for node in nodes:
        try:
            node.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", node.name, grace)
            node.popen.kill()
            node.popen.wait()


def wait_for_members(entry: str, supernodes: int, edges: int, timeout: float,
                     identity: TlsCredentials | None = None) -> None:
    """Poll the entry until it lists ``supernodes`` SNs carrying ``edges`` ENs in total."""
    deadline = time.monotonic() + timeout
    seen = (0, 0)
    while time.monotonic() < deadline:
        try:
            with AdminClient(entry, security=identity) as admin:
                alive = [m for m in admin.nodes() if m.alive]
            seen = (sum(m.role != "edge" for m in alive), sum(m.role == "edge" for m in alive))
            if seen[0] >= supernodes and seen[1] >= edges:
                return
        except NetError as exc:
            log.debug("entry not ready: %s", exc)
        time.sleep(0.3)
    raise ClusterError(f"after {timeout:.0f} s the entry lists {seen[0]} super nodes with {seen[1]} edge nodes; "
                       f"expected {supernodes} and {edges}")


def train(entry: str, rounds: int, emit: Callable[[str], None],
          identity: TlsCredentials | None = None) -> list[RoundLine]:
    """Ask the entry to train ``rounds`` more rounds, relaying its progress; return the progress lines."""
    progress = []
    with AdminClient(entry, security=identity) as admin:
        for line in admin.train(rounds):
            progress.append(line)
            emit(line.text())
    return progress


def check_chains(addresses: Sequence[str], identity: TlsCredentials | None = None,
                 timeout: float = 30.0) -> tuple[int, str]:
    """Every SN verifies its own chain, and all heads must be equal; return (height, hash). A super node whose vote
    was not needed for a block's majority gets it by syncing within a heartbeat or two: heads may differ for up to
    ``timeout`` seconds before that is an error."""
    deadline = time.monotonic() + timeout
    while True:
        heads = {}
        for address in addresses:
            with AdminClient(address, security=identity) as admin:
                ok, _, message = admin.verify()
                if not ok:
                    raise ClusterError(f"the chain of {address} does not verify: {message}")
                head = admin.status().head
            if head is None:
                raise ClusterError(f"the chain of {address} is empty")
            heads[address] = (head.height, head.hash)
        if len(set(heads.values())) == 1:
            return next(iter(heads.values()))
        if time.monotonic() > deadline:
            raise ClusterError(f"super nodes disagree on the head after {timeout:.0f} s: " +
                               ", ".join(f"{a} at {h} {x[:12]}" for a, (h, x) in heads.items()))
        time.sleep(0.5)


def _peak_rss_mib(pid: int) -> float | None:
    """A live process's peak resident memory (VmHWM) in MiB, or None where /proc does not tell."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _node_config_file(cfg: Config, path: Path) -> Path:
    """The run's FL settings, shared by every node through --config (node-specific ones go on the command line)."""
    from dataclasses import asdict
    skip = {"data_root", "db", "ip", "port", "advertise", "entry", "node_type", "is_entry", "partition_index",
            "partition_count", "attack", "attackers"}   # the attack goes to the chosen edge processes only
    defaults = asdict(Config())
    values = {k: v for k, v in asdict(cfg).items() if k not in skip and v != defaults[k] and v is not None}
    path.write_text(json.dumps(values, indent=2))
    return path


def _attackers(cfg: Config, edges: int, emit: Callable[[str], None]) -> list[int]:
    """The shares that run ``cfg.attack``, drawn from the seed as ``simulate`` draws them; announced."""
    if not cfg.attack or cfg.attackers <= 0:
        return []
    from fl.attacks import choose_attackers
    chosen = choose_attackers(cfg.seed, edges, cfg.attackers)
    emit(f"attackers: {len(chosen)} of {edges} edge nodes run {cfg.attack}: shares {', '.join(map(str, chosen))}")
    return chosen


def edge_groups(edges: int, per_process: int, attackers: set[int]) -> list[tuple[int, int]]:
    """(first share, count) of each edge process: consecutive shares, at most ``per_process`` to a process, and
    attacking shares never in a process with honest ones (``--attack`` applies to every edge a process hosts)."""
    groups: list[tuple[int, int]] = []
    for share in range(edges):
        if groups:
            first, count = groups[-1]
            if count < per_process and (first in attackers) == (share in attackers):
                groups[-1] = (first, count + 1)
                continue
        groups.append((share, 1))
    return groups


def run_cluster(cfg: Config, supernodes: int, edges: int, rounds: int, emit: Callable[[str], None] = print,
                start_timeout: float = 120.0, edges_per_process: int = 1, secure: bool = True) -> dict:
    """Start the topology, train ``rounds`` rounds, check every chain and equal heads, stop everything.

    ``edges_per_process`` > 1 hosts the edge nodes that many to a process (``main.py node --hosted-edges``).
    ``secure`` (the default) runs the network in secure mode: the entry creates the CA and the join tokens, every
    other node joins with its token, and this command speaks to the nodes as the operator.
    """
    import shutil

    from storage.engine import sibling_url
    from storage.store import LedgerStore
    root = Path(cfg.data_root).resolve() / "cluster"
    shutil.rmtree(root, ignore_errors=True)     # a cluster run starts from fresh chains
    root.mkdir(parents=True)
    if cfg.threads == 0:   # several trainers share the cores: one torch thread each avoids oversubscription
        from dataclasses import replace
        cfg = replace(cfg, threads=1)
    conf = _node_config_file(cfg, root / "cluster.json")
    nodes: list[NodeProcess] = []
    started = time.perf_counter()
    signals = StopSignals()
    try:
        sn_args = []
        for i in range(supernodes):
            args = ["--config", str(conf), "--nt", "SN", "--port", "0"]
            if cfg.db:
                url = sibling_url(cfg.db, f"sn{i}")
                LedgerStore(url).reset()
                args += ["--db", url]
            sn_args.append(args)
        mode = ["--secure"] if secure else []
        entry_node = start_node("sn0", root / "sn0", [*sn_args[0], "-z", *mode])
        nodes.append(entry_node)
        entry = entry_node.wait_ready(time.monotonic() + start_timeout)
        emit(f"entry super node sn0 on {entry}" + (" (secure mode)" if secure else " (open mode)"))
        identity: TlsCredentials | None = None
        join: dict[str, list[str]] = {"SN": [], "EN": []}
        if secure:
            identity = TlsCredentials.load(entry_node.data_root / "admin")
            joins = ["--join-address", entry_node.info["join_address"]]
            join = {"SN": ["--join", f"@{entry_node.data_root / 'join-sn.token'}", *joins],
                    "EN": ["--join", f"@{entry_node.data_root / 'join-en.token'}", *joins]}
        for i in range(1, supernodes):
            nodes.append(start_node(f"sn{i}", root / f"sn{i}", [*sn_args[i], "--entry", entry, *join["SN"]]))
        # Every super node joins before any edge node, so edge node i goes to super node i mod K (in join order),
        # the grouping `simulate --sn K` uses: the same seed gives the same model in every block.
        deadline = time.monotonic() + start_timeout
        for node in nodes[1:]:
            node.wait_ready(deadline)
            emit(f"{node.name} on {node.address}")
        wait_for_members(entry, supernodes, 0, start_timeout, identity)
        edge_nodes_from = len(nodes)
        attackers = set(_attackers(cfg, edges, emit))
        for first, hosted in edge_groups(edges, edges_per_process, attackers):
            name = f"en{first}" if hosted == 1 else f"en{first}-{first + hosted - 1}"
            attack = ["--attack", cfg.attack] if first in attackers and cfg.attack else []
            nodes.append(start_node(name, root / name,
                                    ["--config", str(conf), "--nt", "EN", "--port", "0", "--entry", entry,
                                     "--partition-index", str(first), "--partition-count", str(edges),
                                     "--hosted-edges", str(hosted), *attack, *join["EN"]]))
        deadline = time.monotonic() + start_timeout
        for node in nodes[edge_nodes_from:]:
            node.wait_ready(deadline)
            emit(f"{node.name} on {node.address}")
        wait_for_members(entry, supernodes, edges, start_timeout, identity)
        emit(f"{supernodes} super nodes and {edges} edge nodes registered; training {rounds} rounds")
        progress = train(entry, rounds, emit, identity)
        height, head = check_chains([n.address for n in nodes if n.name.startswith("sn") and n.address], identity)
        emit(f"all {supernodes} chains verify; head height {height} hash {head}")
        final = next((p.metrics for p in reversed(progress) if p.finished), {})
        return {"supernodes": supernodes, "edges": edges, "rounds": rounds, "secure": secure, "head_height": height,
                "head_hash": head, "final_accuracy": final.get("accuracy"),
                "round_timings": [p.timings for p in progress if p.finished], "attackers": sorted(attackers),
                "peak_rss_mib": {n.name: _peak_rss_mib(n.popen.pid) for n in nodes},
                "wall_s": round(time.perf_counter() - started, 3), "root": str(root)}
    except NetError as exc:
        raise ClusterError(str(exc)) from exc
    finally:
        signals.stopping = True
        try:
            emit("stopping all nodes")
        finally:
            stop_all(nodes)
            signals.restore()
