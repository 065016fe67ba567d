"""A real network in the test process for the network and console tests: K super nodes (the entry first, all
joined before any edge node, so edge i goes to super node i mod K, and each admitted to the validator set by a
membership block before the next joins: blocks 1..K-1) and N edge nodes on loopback gRPC, whose participants can
be made to fail."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from chain.block import SignedBlock
from chain.keys import NodeKey
from chain.validators import is_membership
from chain.verify import Head
from config import Config
from conftest import wait_until
from fl.participant import EvalRes, FitIns, FitRes
from node.engine.edge import EdgeCore
from node.ledger import Ledger
from node.process.edge import EdgeNode
from node.process.launch import edge_pacer
from node.process.supernode import SuperNode
from node.rpc.clients import AdminClient, RoundLine
from node.run import configure_torch, edge_cores

BEAT = 0.2
# Members are dropped after MISSED_BEATS silent beats (5 s). Building the edge participants holds the GIL for
# seconds in this one process, so the 3-beat default (0.6 s) made SNs and ENs flap and ENs move between SNs.
MISSED_BEATS = 25


def config(root: Path, **over: Any) -> Config:
    settings: dict[str, Any] = {"dataset": "mnist", "model": "2nn", "clients": 4, "rounds": 2, "partition_count": 4,
                                "threads": 1, "reproducible": True,
                                "retry_for_s": 0.0}   # a failed round ends the job: tests see the failure at once
    return Config(**{**settings, **over, "data_root": str(root)})


class Flaky:
    """A participant that can be made to die in the middle of a round."""

    def __init__(self, inner: Any):
        self.inner, self.participant_id = inner, inner.participant_id
        self.broken = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns, **options: Any) -> FitRes:
        if self.broken:
            raise RuntimeError("edge node crashed while training")
        return self.inner.fit(weights, ins, **options)

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return self.inner.evaluate(weights)


class Network:
    """K super nodes (the entry first, all joined before any edge node) and N edge nodes, in this process."""

    def __init__(self, root: Path, supernodes: int, edges: int, **over: Any):
        self.root = root
        self.cfg = config(root / "entry", **over)
        configure_torch(self.cfg)
        self.sns: list[SuperNode] = []
        self.ens: list[EdgeNode] = []
        self.flaky: list[Flaky] = []
        self.sns.append(self.make_sn("entry", entry=None))
        for i in range(1, supernodes):
            self.sns.append(self.make_sn(f"sn{i}", entry=self.entry.address))
            # one at a time, so the join order (and with it the edge assignment) is sn1, sn2, ...; each is a
            # validator (admitted by membership block i) before the next joins
            assert wait_until(lambda n=i + 1: len(self.entry.registry) == n, timeout=15.0)
            assert wait_until(lambda n=i + 1: len(self.entry.ledger.validators) == n, timeout=30.0), \
                f"sn{i} was not admitted as a validator"
        keys = [NodeKey.from_seed(f"edge{i}".encode()) for i in range(edges)]
        cores, bench, dataset = edge_cores(self.cfg, keys, 0, edges)
        pacer = edge_pacer(self.cfg, bench, dataset)   # under a scenario: each edge node spends its profile's time
        for core in cores:
            flaky = Flaky(core.participant)
            en = EdgeNode(EdgeCore(flaky, core.key, share=core.share, attack=core.attack),  # type: ignore[arg-type]
                          "127.0.0.1:0", self.entry.address, heartbeat_interval=BEAT, pacer=pacer)
            en.start()
            self.flaky.append(flaky)
            self.ens.append(en)
        assert wait_until(lambda: sum(len(sn.edges) for sn in self.sns) == edges, timeout=15.0), \
            "edge nodes did not join"

    def make_sn(self, name: str, entry: str | None, listen: str = "127.0.0.1:0") -> SuperNode:
        ledger = Ledger.open(self.root / name, key=NodeKey.from_seed(name.encode()))
        cfg = dataclasses.replace(self.cfg, data_root=str(self.root / name), is_entry=entry is None)
        sn = SuperNode(ledger, listen, cfg, entry=entry, heartbeat_interval=BEAT, missed_beats=MISSED_BEATS)
        sn.start()
        return sn

    @property
    def entry(self) -> SuperNode:
        return self.sns[0]

    @property
    def port(self) -> int:
        return self.entry.port

    def block(self, height: int) -> SignedBlock:
        """The entry's block at ``height``, once durable."""
        self.entry.ledger.flush()
        return self.entry.ledger.get_block(height)[0]

    def head(self) -> Head:
        """The entry's head, once durable."""
        self.entry.ledger.flush()
        head = self.entry.ledger.head
        assert head is not None
        return head

    def admin(self, sn: SuperNode | None = None) -> AdminClient:
        return AdminClient((sn or self.entry).address)

    def train(self, rounds: int, sn: SuperNode | None = None) -> list[RoundLine]:
        with self.admin(sn) as admin:
            return list(admin.train(rounds))

    def close(self) -> None:
        for node in self.ens + self.sns[::-1]:
            node.stop(None)
        for sn in self.sns:
            sn.ledger.close()


def model_hashes(ledger: Ledger) -> list[str]:
    """The model of every block but the membership blocks (they keep the model): one per round, as simulate's."""
    ledger.flush()
    head = ledger.head
    assert head is not None
    headers = [ledger.get_block(h)[0].header for h in range(head.height + 1)]
    return [header.model_hash for header in headers if not is_membership(header)]
