"""The virtual clock: what a round of a scenario costs in simulated time, and who makes it. The proposer plans every
round with it, in the simulator and on the network alike: it picks the round's edge nodes among those online
(over-committing), computes each one's download, training and upload from its profiles, drops those that would go
offline, miss the deadline or fall outside the first K to finish (they are not trained at all), and adds the
partials' transfer, co-signing and commit on the backbone. On the network each node also spends that time for
real (node.engine.pacing), so measured round times can be held against the plan."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from config import ConfigError
from fl.server import RoundFailed
from node.engine.profiles import LinkProfile, jitter_draw
from node.engine.scenario import Scenario
from node.engine.types import SIM, EdgeRef, EdgeTiming, RoundPlan

ANNOUNCE_BYTES = 1024    # an announcement: ids of the selected edge nodes and the plan
COSIGN_BYTES = 512       # a co-signature or a commit


class EmptyRound(RoundFailed):
    """A scenario's round in which no selected edge node can train (all offline, late or none online): the clock
    has moved on by the time the round waited; the same round can be tried again later in simulated time."""


MEAN_DRAW = math.sqrt(2 / math.pi)   # the mean of |z|: super nodes' links take their mean jitter, so the timeline
                                    # does not depend on their keys (which differ between runs and machines)


def announce_s(backbone: LinkProfile) -> float:
    return backbone.transfer_s(ANNOUNCE_BYTES, up=False, draw=MEAN_DRAW)


def partial_s(backbone: LinkProfile, nbytes: int) -> float:
    return backbone.transfer_s(nbytes, up=True, draw=MEAN_DRAW)


def block_s(backbone: LinkProfile, nbytes: int) -> float:
    """A proposed block with its model to a validator, and its co-signature back."""
    return backbone.transfer_s(nbytes, up=False, draw=MEAN_DRAW) + backbone.transfer_s(COSIGN_BYTES, up=True,
                                                                                      draw=MEAN_DRAW)


def commit_s(backbone: LinkProfile) -> float:
    return backbone.transfer_s(COSIGN_BYTES, up=False, draw=MEAN_DRAW) + backbone.transfer_s(COSIGN_BYTES, up=True,
                                                                                            draw=MEAN_DRAW)


def edge_key(index: int) -> str:
    return f"edge{index}"


class VirtualClock:
    """A scenario's simulated time over a run's rounds. ``now_s`` is the clock at the end of the last round."""

    def __init__(self, scenario: Scenario, seed: int, flops_per_sample: float, epochs: int, fraction: float):
        self.scenario = scenario
        self.seed = seed
        self.flops_per_sample = flops_per_sample
        self.epochs = epochs
        self.fraction = fraction
        self.now_s = 0.0
        self.height: int | None = None   # the block whose end ``now_s`` is (None: not read from the chain yet)

    def resume(self, params: Mapping[str, Any]) -> None:
        """Set the clock from a block's params (the head's), when it carries simulated time."""
        sim = params.get(SIM)
        if isinstance(sim, Mapping) and isinstance(sim.get("clock_ms"), int):
            self.now_s = sim["clock_ms"] / 1000.0

    def compute_s(self, index: int, samples: int, epochs: int | None = None) -> float:
        device = self.scenario.edges[index].device
        per_sample = device.seconds_per_sample(self.flops_per_sample, self.scenario.host_gflops)
        return samples * (epochs if epochs is not None else self.epochs) * per_sample

    def down_s(self, index: int, round: int, nbytes: int) -> float:
        link = self.scenario.edges[index].link
        return link.transfer_s(nbytes, up=False, draw=jitter_draw(self.seed, round, edge_key(index), "down"))

    def up_s(self, index: int, round: int, nbytes: int) -> float:
        link = self.scenario.edges[index].link
        return link.transfer_s(nbytes, up=True, draw=jitter_draw(self.seed, round, edge_key(index), "up"))

    def _index(self, edge: EdgeRef) -> int:
        if edge.share is None or not 0 <= edge.share < self.scenario.edge_nodes:
            raise ConfigError(f"edge node {edge.node_id} has data share {edge.share}, but the scenario "
                              f"{self.scenario.source} describes edge nodes 0..{self.scenario.edge_nodes - 1}")
        return edge.share

    def plan(self, round: int, edges: Sequence[EdgeRef], holder: Mapping[str, str], proposer: str,
             validators: Sequence[str], model_bytes: int, forwards: bool) -> RoundPlan:
        """The round's plan. ``edges``: every live edge node in share order; ``holder``: edge id -> the super node
        that trains it; ``validators``: node ids of the other validators that co-sign; ``model_bytes``: the encoded
        model a transfer carries (an update is the same size)."""
        start, scenario = self.now_s, self.scenario
        online = [e for e in edges if scenario.offline_at(self._index(e), self.seed, start, start + 1e-9) is None]
        target = max(1, math.floor(self.fraction * len(edges) + 1e-9))
        wanted = min(len(online), math.ceil(scenario.overcommit * target - 1e-9))
        if wanted < len(online):
            picks = np.random.default_rng([self.seed, round]).choice(len(online), size=wanted, replace=False)
            chosen = [online[i] for i in sorted(int(i) for i in picks)]
        else:
            chosen = list(online)
        backbone, deadline = scenario.backbone, scenario.deadline_s
        arrival = {sn: 0.0 if sn == proposer else announce_s(backbone)
                   for sn in sorted({holder.get(e.node_id, proposer) for e in chosen})}
        timings: list[EdgeTiming] = []
        for e in chosen:
            index, sn = self._index(e), holder.get(e.node_id, proposer)
            down = self.down_s(index, round, model_bytes)
            compute = self.compute_s(index, e.samples or 0)
            up = self.up_s(index, round, model_bytes)
            finish = arrival[sn] + down + compute + up
            reason = None
            gone = scenario.offline_at(index, self.seed, start, start + finish)
            if gone is not None:
                reason = f"went offline at {gone - start:.1f} s into the round"
            elif deadline is not None and finish > deadline:
                reason = f"misses the deadline (would finish at {finish:.1f} s of {deadline:g} s)"
            timings.append(EdgeTiming(e.node_id, index, sn, "dropped" if reason else "trained", reason, down,
                                      compute, up, finish))
        finishers = sorted((t for t in timings if t.status == "trained"), key=lambda t: (t.finish_s, t.index))
        late = {t.edge for t in finishers[target:]}
        timings = [replace(t, status="dropped", reason=f"not among the first {target} to finish") if t.edge in late
                   else t for t in timings]
        kept = [t for t in timings if t.status == "trained"]
        ready: dict[str, tuple[float, int]] = {}
        for t in kept:
            last, count = ready.get(t.sn, (0.0, 0))
            ready[t.sn] = (max(last, t.finish_s), count + 1)
        partials = 0.0
        for sn, (last, count) in ready.items():
            nbytes = model_bytes * (count if forwards else 1)
            partials = max(partials, last + (0.0 if sn == proposer else
                                             partial_s(backbone, nbytes)))
        cosign = commit = 0.0
        if validators and kept:
            # A strict majority needs at least one other validator's co-signature; every validator sits behind the
            # same backbone, so the majority's is any one's.
            cosign = block_s(backbone, model_bytes)
            commit = commit_s(backbone)
        if not kept:   # nobody makes it: the round waits out its deadline (or the slowest) and has no block
            partials = deadline if deadline is not None else max((t.finish_s for t in timings), default=0.0)
        return RoundPlan(round, start, partials + cosign + commit, [t.edge for t in kept], timings, len(online),
                         deadline, {"partials_s": partials, "cosign_s": cosign, "commit_s": commit})

    def advance(self, plan: RoundPlan, seconds: float | None = None) -> None:
        """Move the clock to the round's end (or ``seconds`` after its start), in whole milliseconds as blocks
        record it, so a resumed run continues exactly where an uninterrupted one would be."""
        end = plan.end_s if seconds is None else plan.start_s + seconds
        self.now_s = round(end * 1000) / 1000


def idle_s(scenario: Scenario) -> float:
    """How far the clock moves when a round has nobody to train: the deadline, or a minute without one."""
    return scenario.deadline_s if scenario.deadline_s is not None else 60.0
