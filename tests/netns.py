"""Two hosts on one machine for checking the scenario's bandwidth model against the kernel: two network namespaces
joined by a veth pair whose ends are both rate-limited by `tc qdisc ... tbf`, an entry super node in one and an edge
node in the other (real processes, `--no-link-shaping`: only compute is paced, the links are the kernel's), and a
driver that trains through the Admin service from inside the super node's namespace.

Used by tests/test_netns_bandwidth.py and bench/bench_tbf.py. Run as a script (inside a namespace) it is that
driver, or one end of a raw TCP transfer:

    python tests/netns.py drive HOST:PORT ROUNDS     # wait for 1 SN + 1 EN, train, print one JSON line per round
    python tests/netns.py recv HOST PORT             # accept one connection, read it to its end, print JSON
    python tests/netns.py send HOST PORT NBYTES
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # run as a script: tests/ is sys.path[0], the project is not
    sys.path.insert(0, str(ROOT))

from node.cli.cluster import NodeProcess, stop_all  # noqa: E402
from node.process import PARENT_ENV, READY_FILE  # noqa: E402

SN_PORT, EN_PORT = 8080, 8090
SHARES = 20              # the scenario describes 20 edge shares; only share 0 runs (200 of the 4,000 images)
# 200 images x 73.6 MFLOP / 2 GFLOP/s: 7.4 s of training, padded to that by the edge node. A node's first training
# pays torch's cold start (2.6 s alone, 5.7 s beside a test run on 2 cores, against 0.3-0.5 s warm): a faster
# device would be outrun by this machine in round 1, and that round would measure the machine, not the link.
DEVICE_GFLOPS = 2.0
TBF = ["burst", "32kbit", "latency", "400ms"]


class NetnsUnavailable(RuntimeError):
    """This machine cannot create network namespaces (not root, no `ip`, or a kernel without them)."""


class NetnsError(RuntimeError):
    """A command that sets up or measures the link failed; the message has its output."""


def _run(cmd: Sequence[str], timeout: float = 30.0) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise NetnsError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


@dataclass
class QdiscStats:
    sent_bytes: int
    packets: int
    dropped: int
    overlimits: int   # times tbf held a packet back for want of tokens: the shaping at work


@dataclass
class ShapedLink:
    """Namespaces ``ns[0]`` (the super node's, address ``ips[0]``) and ``ns[1]`` (the edge node's), joined by the
    veth pair ``veth[0]``/``veth[1]``, each end's egress limited to ``rate_mbit``."""

    ns: tuple[str, str]
    veth: tuple[str, str]
    ips: tuple[str, str]
    rate_mbit: float

    def exec(self, side: int, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run inside namespace ``side``."""
        return ["ip", "netns", "exec", self.ns[side], *cmd]

    def stats(self, side: int) -> QdiscStats:
        """The tbf counters of ``veth[side]``'s egress (`tc -s qdisc show`)."""
        out = _run(self.exec(side, ["tc", "-s", "qdisc", "show", "dev", self.veth[side]]))
        if " tbf " not in f" {out}":
            raise NetnsError(f"no tbf qdisc on {self.veth[side]} in {self.ns[side]}:\n{out}")
        found = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", out)
        if found is None:
            raise NetnsError(f"cannot read the counters of {self.veth[side]}:\n{out}")
        return QdiscStats(*(int(g) for g in found.groups()))


def probe_namespaces() -> None:
    """Raise NetnsUnavailable, with the system's own words, when a namespace cannot be created here."""
    name = f"flprobe{os.getpid()}"
    try:
        subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, check=True, timeout=10)
    except FileNotFoundError as exc:
        raise NetnsUnavailable(f"no `ip` command: {exc}") from exc
    except subprocess.CalledProcessError as exc:
        raise NetnsUnavailable(f"`ip netns add` failed: {exc.stderr.strip()}") from exc
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)


@contextmanager
def shaped_link(rate_mbit: float, tag: str = "") -> Iterator[ShapedLink]:
    """Two namespaces and a veth pair between them, tbf at ``rate_mbit`` on both ends; all deleted on exit.

    Names carry this process's pid (and ``tag``), so runs side by side do not meet; deleting a namespace deletes
    the veth end in it, and with it the pair."""
    pid = os.getpid()
    stem = f"fl{pid}{tag}"
    if len(stem) + 1 > 15:   # an interface name has at most 15 characters
        raise ValueError(f"tag {tag!r} makes interface names too long")
    link = ShapedLink(ns=(f"{stem}-sn", f"{stem}-en"), veth=(f"{stem}a", f"{stem}b"),
                      ips=(f"10.231.{pid % 250 + 1}.1", f"10.231.{pid % 250 + 1}.2"), rate_mbit=rate_mbit)
    created: list[str] = []
    try:
        for ns in link.ns:
            _run(["ip", "netns", "add", ns])
            created.append(ns)
        _run(["ip", "link", "add", link.veth[0], "netns", link.ns[0], "type", "veth",
              "peer", "name", link.veth[1], "netns", link.ns[1]])
        for side in (0, 1):
            _run(link.exec(side, ["ip", "addr", "add", f"{link.ips[side]}/24", "dev", link.veth[side]]))
            _run(link.exec(side, ["ip", "link", "set", link.veth[side], "up"]))
            _run(link.exec(side, ["ip", "link", "set", "lo", "up"]))
            _run(link.exec(side, ["tc", "qdisc", "add", "dev", link.veth[side], "root", "tbf",
                                  "rate", f"{rate_mbit:g}mbit", *TBF]))
        yield link
    finally:
        for ns in reversed(created):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def write_scenario(path: Path, rate_mbit: float, rtt_ms: float = 0.1, gflops: float = DEVICE_GFLOPS) -> Path:
    """The scenario the nodes plan with: SHARES edge shares, each a DEVICE_GFLOPS device on a symmetric link."""
    path.write_text(f"""[network]
super_nodes = 1
edge_nodes = {SHARES}
[defaults]
device = {{ gflops = {gflops:g} }}
link = {{ rtt_ms = {rtt_ms:g}, up_mbps = {rate_mbit:g}, down_mbps = {rate_mbit:g} }}
""")
    return path


def model_facts(gflops: float = DEVICE_GFLOPS) -> tuple[int, float]:
    """(bytes of the MNIST CNN's encoded weights, the seconds edge share 0 trains on a ``gflops`` device: what the
    edge node pads its training to), computed here, not read from the nodes."""
    from chain.tensors import encode_weights
    from fl.cost import train_flops_per_sample
    from fl.models import build_model
    model = build_model("cnn")
    weights = {k: v.numpy() for k, v in model.state_dict().items()}
    samples = 4000 // SHARES   # iid share 0 of the offline MNIST sample's 4,000 training images
    return len(encode_weights(weights)), samples * train_flops_per_sample(model, (1, 28, 28)) / (gflops * 1e9)


def start_in(link: ShapedLink, side: int, name: str, data_root: Path, args: Sequence[str]) -> NodeProcess:
    """``python main.py node ARGS`` inside namespace ``side`` (as node.cli.cluster.start_node, which runs on the
    host); `ip netns exec` execs the node in its own place, so the pid is the node's."""
    data_root.mkdir(parents=True, exist_ok=True)
    (data_root / READY_FILE).unlink(missing_ok=True)
    with open(data_root / "node.log", "ab") as log_file:
        popen = subprocess.Popen(link.exec(side, [sys.executable, str(ROOT / "main.py"), "node",
                                                  "--data-root", str(data_root), *args]),
                                 cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env={**os.environ, PARENT_ENV: str(os.getpid())}, start_new_session=True)
    return NodeProcess(name, data_root, popen)


def raw_goodput_mbit(link: ShapedLink, nbytes: int, port: int = 9099) -> float:
    """Mbit/s of payload the edge's namespace receives over plain TCP from the super node's (``nbytes`` sent, timed
    from the first byte to the last): the tbf link's own goodput, with no gRPC or node in the way."""
    script = str(Path(__file__).resolve())
    receiver = subprocess.Popen(link.exec(1, [sys.executable, script, "recv", link.ips[1], str(port)]),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _run(link.exec(0, [sys.executable, script, "send", link.ips[1], str(port), str(nbytes)]),
                     timeout=120)
                break
            except NetnsError:   # the receiver is not listening yet
                if time.monotonic() > deadline or receiver.poll() is not None:
                    raise
                time.sleep(0.2)
        out, err = receiver.communicate(timeout=60)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    if receiver.returncode != 0:
        raise NetnsError(f"the receiver failed: {err.strip()}")
    result = json.loads(out)
    if result["bytes"] != nbytes:
        raise NetnsError(f"the receiver got {result['bytes']} of {nbytes} bytes")
    return 8 * result["timed_bytes"] / result["seconds"] / 1e6


def train_over_link(link: ShapedLink, root: Path, scenario: Path, rounds: int,
                    start_timeout: float = 120.0) -> list[dict[str, float]]:
    """Start the entry super node in ``link.ns[0]`` and edge share 0 of SHARES in ``link.ns[1]``, both
    `--no-link-shaping` under ``scenario``; train ``rounds`` rounds; return each finished round's timings. The
    nodes are stopped (by pid) before returning. The log of a node that failed is in the error."""
    common = ["--scenario", str(scenario), "--no-link-shaping", "--seed", "0", "--reproducible", "--insecure",
              "--threads", "1", "--clients", str(SHARES)]
    entry = f"{link.ips[0]}:{SN_PORT}"
    nodes: list[NodeProcess] = []
    try:
        nodes.append(start_in(link, 0, "sn0", root / "sn0", [
            "--nt", "SN", "-z", "--ip", link.ips[0], "--port", str(SN_PORT), *common]))
        nodes[0].wait_ready(time.monotonic() + start_timeout)
        nodes.append(start_in(link, 1, "en0", root / "en0", [
            "--nt", "EN", "--entry", entry, "--ip", link.ips[1], "--port", str(EN_PORT),
            "--partition-index", "0", "--partition-count", str(SHARES), *common]))
        nodes[1].wait_ready(time.monotonic() + start_timeout)
        proc = subprocess.run(link.exec(0, [sys.executable, str(Path(__file__).resolve()), "drive", entry,
                                            str(rounds)]),
                              capture_output=True, text=True, timeout=start_timeout + rounds * 120)
        if proc.returncode != 0:
            logs = "\n".join(f"--- {n.name} ---\n{_tail(n.data_root / 'node.log')}" for n in nodes)
            raise NetnsError(f"training over the link failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}\n"
                             f"{logs}")
        return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    finally:
        stop_all(nodes)


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text().splitlines()[-lines:])
    except OSError:
        return ""


# ---- run inside a namespace --------------------------------------------------------------------------------------

def _drive(entry: str, rounds: int) -> int:
    """Wait until the entry lists one super node and one edge node, train, print each finished round's timings."""
    from node.cli.cluster import wait_for_members
    from node.rpc.clients import AdminClient
    wait_for_members(entry, 1, 1, 90)
    with AdminClient(entry) as admin:
        for line in admin.train(rounds):
            if line.error:
                print(f"training stopped: {line.text()}", file=sys.stderr)
                return 1
            if line.finished:
                print(json.dumps({"round": line.round, **line.timings}), flush=True)
    return 0


def _recv(host: str, port: int) -> int:
    """Accept one connection, read to its end; print the bytes, and the seconds and bytes after the first read."""
    with socket.create_server((host, port)) as server:
        server.settimeout(30)
        conn, _ = server.accept()
        with conn:
            total, first, first_len = 0, 0.0, 0
            while chunk := conn.recv(1 << 16):
                if not total:
                    first, first_len = time.perf_counter(), len(chunk)
                total += len(chunk)
            seconds = time.perf_counter() - first
    print(json.dumps({"bytes": total, "timed_bytes": total - first_len, "seconds": seconds}))
    return 0


def _send(host: str, port: int, nbytes: int) -> int:
    with socket.create_connection((host, port), timeout=10) as conn:
        conn.sendall(bytes(nbytes))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)   # wait for the receiver to close: every byte has arrived
    return 0


def main(argv: Sequence[str]) -> int:
    command, *rest = argv
    if command == "drive":
        return _drive(rest[0], int(rest[1]))
    if command == "recv":
        return _recv(rest[0], int(rest[1]))
    if command == "send":
        return _send(rest[0], int(rest[1]), int(rest[2]))
    print(f"unknown command {command!r}: drive, recv or send", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
