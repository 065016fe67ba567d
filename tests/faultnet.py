"""A network of real node processes for fault tests: super nodes on fixed loopback ports (so one restarts at the same
address), edge-node hosts, a background training run through the Admin service, a monitor of the heads, and an
audit of every super node's stored chain (nothing lost, duplicated or forked; every chain verifies offline)."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from conftest import free_port
from node.cli.cluster import NodeProcess, start_node, wait_for_members
from node.engine.errors import NetError
from node.rpc.clients import AdminClient, RoundLine

ROOT = Path(__file__).resolve().parent.parent
ROUND_TIMEOUT = 12.0   # --round-timeout of every node: a frozen peer stalls a round at most this long
COMMON = ["--model", "2nn", "--threads", "1", "--clients", "4", "--local-epochs", "3", "--reproducible",
          "--heartbeat", "0.5", "--dead-after", "3", "--round-timeout", str(ROUND_TIMEOUT), "--retry-for", "180"]


@dataclass
class Run:
    """A training run followed in the background: its progress lines, and whether the stream ended."""

    lines: list[RoundLine] = field(default_factory=list)
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def final(self) -> list[tuple[int, str]]:
        """(height, hash) of every block the run reported final."""
        return [(line.height, line.block_hash) for line in self.lines if line.finished]


class FaultNet:
    """``supernodes`` super nodes (sn0 the entry) and edge hosts of two edge nodes each (4 edge nodes in all)."""

    def __init__(self, root: Path, supernodes: int = 3, hosts: Sequence[int] = (0, 2),
                 db: Callable[[str], str] | None = None):
        self.root = root
        self.db = db
        self.ports = {f"sn{i}": free_port() for i in range(supernodes)}
        self.procs: dict[str, NodeProcess] = {}
        self.frozen: set[str] = set()
        self.heights: list[tuple[float, int]] = []   # (monotonic time, height) seen by the monitor
        self._stop = threading.Event()
        self.entry = f"127.0.0.1:{self.ports['sn0']}"
        try:
            for i in range(supernodes):
                self.start_sn(f"sn{i}")
            wait_for_members(self.entry, supernodes, 0, 90)
            self.wait_validators(supernodes)
            for first in hosts:
                name = f"en{first}"
                self.procs[name] = start_node(name, root / name, [
                    "--nt", "EN", "--port", "0", "--entry", self.entry, "--partition-index", str(first),
                    "--partition-count", "4", "--hosted-edges", "2", *COMMON])
                self.procs[name].wait_ready(time.monotonic() + 120)
            wait_for_members(self.entry, supernodes, 2 * len(hosts), 90)
        except BaseException:
            self.close()
            raise
        self._monitor = threading.Thread(target=self._watch, daemon=True)
        self._monitor.start()

    # ---- processes ------------------------------------------------------------------------------------------

    def start_sn(self, name: str) -> None:
        args = ["--nt", "SN", "--port", str(self.ports[name]), *COMMON]
        args += ["-z"] if name == "sn0" else ["--entry", self.entry]
        if self.db is not None:
            args += ["--db", self.db(name)]
        self.procs[name] = start_node(name, self.root / name, args)
        self.procs[name].wait_ready(time.monotonic() + 120)

    def signal(self, name: str, sig: signal.Signals) -> None:
        if sig == signal.SIGSTOP:
            self.frozen.add(name)   # the monitor does not wait on it (its status call would time out)
        elif sig == signal.SIGCONT:
            self.frozen.discard(name)
        self.procs[name].popen.send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[name].popen.wait(timeout=30)

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def close(self) -> None:
        self._stop.set()
        for proc in self.procs.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGCONT)
                proc.popen.terminate()
        for proc in self.procs.values():
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=10)

    # ---- training and observation ---------------------------------------------------------------------------

    def wait_validators(self, count: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with AdminClient(self.entry) as admin:
                if len(admin.status().validators) == count:
                    return
            time.sleep(0.3)
        raise AssertionError(f"the entry did not record {count} validators in {timeout:.0f} s")

    def train(self, rounds: int, at: str | None = None) -> Run:
        """Start training ``rounds`` rounds at ``at`` (default the entry), followed in a background thread."""
        run = Run()

        def follow() -> None:
            try:
                with AdminClient(at or self.entry) as admin:
                    for line in admin.train(rounds):
                        run.lines.append(line)
            except NetError as exc:
                run.error = str(exc)
            finally:
                run.done.set()

        threading.Thread(target=follow, daemon=True).start()
        return run

    def head(self, name: str) -> tuple[int, str, int] | None:
        """(height, hash, round) of a super node's durable head, asked over its Admin service (None: no answer)."""
        try:
            with AdminClient(self.address(name)) as admin:
                head = admin.status(timeout=3).head
        except NetError:
            return None
        return None if head is None else (head.height, head.hash, 0)

    def _watch(self) -> None:
        while not self._stop.is_set():
            best = -1
            for name in self.ports:
                proc = self.procs.get(name)
                if proc is None or proc.popen.poll() is not None or name in self.frozen:
                    continue
                head = self.head(name)
                if head is not None:
                    best = max(best, head[0])
            if best >= 0 and (not self.heights or best > self.heights[-1][1]):
                self.heights.append((time.monotonic(), best))
            self._stop.wait(0.3)

    def height(self) -> int:
        """The highest durable head the monitor has seen (-1: none yet)."""
        return self.heights[-1][1] if self.heights else -1

    def wait_height(self, height: int, timeout: float) -> float:
        """Wait until some super node's durable head reaches ``height``; return when it did."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, seen in self.heights:
                if seen >= height:
                    return at
            time.sleep(0.2)
        raise AssertionError(f"no super node reached height {height} in {timeout:.0f} s; seen {self.heights[-3:]}")

    def longest_stall(self, since: float, until: float) -> float:
        """The longest time between two new heights within [since, until]."""
        times = [since] + [at for at, _ in self.heights if since < at <= until] + [until]
        return max(b - a for a, b in zip(times, times[1:], strict=False))

    # ---- the audit ------------------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        return self.db(name) if self.db is not None else f"sqlite:///{self.root / name / 'ledger.db'}"

    def chain(self, name: str) -> list[tuple[int, str, int, int]]:
        """(height, hash, round, records) of every block a super node stored, read from its database."""
        url = self.url(name)
        query = ("SELECT b.height, b.hash, b.round, (SELECT COUNT(*) FROM update_records r WHERE r.height = b.height) "
                 "FROM blocks b ORDER BY b.height")
        if url.startswith("sqlite"):
            with sqlite3.connect(f"file:{self.root / name / 'ledger.db'}?mode=ro", uri=True) as conn:
                return [tuple(row) for row in conn.execute(query)]
        engine = create_engine(url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(query))]
        finally:
            engine.dispose()

    def audit(self, reported: Sequence[tuple[int, str]] = ()) -> int:
        """Every super node's chain verifies offline and all are equal (no fork); no round is in two blocks; every
        block reported final is in them. Returns the common head height."""
        chains = {name: self.chain(name) for name in self.ports}
        for name in self.ports:
            result = subprocess.run([sys.executable, str(ROOT / "main.py"), "verify", "--db", self.url(name),
                                     "--checkpoint", str(self.root / name / "checkpoint.json"), "--json"],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"{name} does not verify: {result.stdout}{result.stderr}"
            assert json.loads(result.stdout.splitlines()[-1])["head_height"] == chains[name][-1][0]
        first = next(iter(chains.values()))
        for name, chain in chains.items():
            assert [(h, x) for h, x, _, _ in chain] == [(h, x) for h, x, _, _ in first], \
                f"{name} forked or lags: {chain[-3:]} vs {first[-3:]}"
        rounds = [r for _, _, r, records in first if records]
        assert len(rounds) == len(set(rounds)), f"a round is in two blocks: {rounds}"
        stored = {(h, x) for h, x, _, _ in first}
        lost = [block for block in reported if block not in stored]
        assert not lost, f"blocks reported final but not stored: {lost}"
        return first[-1][0]

    def wait_equal(self, timeout: float = 60) -> None:
        """Wait until every super node's durable head is the same block."""
        deadline = time.monotonic() + timeout
        heads: list[tuple[int, str, int] | None] = []
        while time.monotonic() < deadline:
            heads = [self.head(name) for name in self.ports]
            if None not in heads and len(set(heads)) == 1:
                return
            time.sleep(0.5)
        raise AssertionError(f"heads differ after {timeout:.0f} s: {heads}")
