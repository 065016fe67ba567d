"""`main.py simulate`: the network in one process. K super nodes (``--sn``), each with its own ledger and its own
edge nodes, run the one round engine through in-process peers and participants: the entry proposes, the others
train their share, verify, co-sign and store, exactly as over gRPC. Edge node ``i`` belongs to super node
``i mod K`` (the network's assignment when K super nodes joined before the edge nodes)."""
from __future__ import annotations

import csv
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from chain.tensors import decode_weights, encode_weights
from config import Config, ConfigError
from fl.aggregate import Weights, weighted_average
from fl.server import RoundFailed
from node.engine.clock import EmptyRound
from node.engine.coordinator import Coordinator
from node.engine.edge import EdgeCore, LocalEdges
from node.engine.supernode import SuperNodeCore
from node.engine.types import Peer, RoundReport
from node.ledger import CHECKPOINT_FILE, Ledger, default_db_url
from node.run import HOST_GFLOPS, RunContext, configure_torch, edge_cores, model_name
from node.sim.plot import svg_chart, svg_timeline
from storage.engine import sibling_url
from storage.store import LedgerStore
from storage.writer import WriterFailed


class ResumeMismatch(ValueError):
    """The ledger was started with other settings than this run's."""


@dataclass
class Simulation:
    cfg: Config
    ctx: RunContext
    supernodes: list[SuperNodeCore]      # the entry first
    edges: list[EdgeCore]                # every edge node, in share order
    coordinator: Coordinator

    @property
    def ledger(self) -> Ledger:
        return self.supernodes[0].ledger

    @property
    def validators(self) -> list[str] | None:
        """The initial validator set genesis records: every super node's key when there are several (each block
        is then co-signed by a majority of them); None with one, whose genesis names its proposer alone."""
        if len(self.supernodes) == 1:
            return None
        return sorted(sn.key.public_hex for sn in self.supernodes)

    def close(self) -> None:
        for sn in self.supernodes:
            sn.ledger.close()


def _ledger_location(cfg: Config, index: int) -> tuple[Path, str]:
    """Super node ``index``'s data root and database: the run's own for the entry; for the others DATA_ROOT/sn<index>
    and its SQLite file, or with --db the database beside it named with a _sn<index> suffix (as `cluster` does)."""
    root = Path(cfg.data_root) if index == 0 else Path(cfg.data_root) / f"sn{index}"
    if cfg.db is None:
        return root, default_db_url(root)
    return root, cfg.db if index == 0 else sibling_url(cfg.db, f"sn{index}")


def prepare(cfg: Config, fresh: bool = False, super_nodes: int = 1,
            on_fit: Callable[[], None] | None = None) -> Simulation:
    """Load data and model, open every super node's ledger, and start a chain or check that it can be resumed."""
    if cfg.attack is not None and cfg.attackers == 0:
        raise ConfigError(f"--attack {cfg.attack} needs --attackers FRACTION: the share of the simulated edge nodes "
                          "that run it (drawn from --seed)")
    if not 1 <= super_nodes <= cfg.clients:
        raise ConfigError(f"--sn {super_nodes}: need between 1 and --clients ({cfg.clients}) super nodes")
    device = configure_torch(cfg)
    ledgers = []
    for index in range(super_nodes):
        root, url = _ledger_location(cfg, index)
        root.mkdir(parents=True, exist_ok=True)
        if fresh:
            store = LedgerStore(url)
            store.reset()
            store.close()
            (root / CHECKPOINT_FILE).unlink(missing_ok=True)
        ledgers.append(Ledger.open(root, url))
    keys = [ledgers[0].key.derive(f"client-{i:03d}") for i in range(cfg.clients)]
    edges, bench, dataset = edge_cores(cfg, keys, 0, cfg.clients, device)
    supernodes: list[SuperNodeCore] = []
    for index, ledger in enumerate(ledgers):
        group = [t for t in edges if t.share is not None and t.share % super_nodes == index]
        upstream: Callable[[], Peer | None] = (lambda: None) if index == 0 else (lambda: supernodes[0])
        supernodes.append(SuperNodeCore(ledger, LocalEdges(group, on_fit), upstream=upstream))

    def personal_layers() -> Weights | None:
        states = [t.participant.personal_state() for t in edges]
        return weighted_average([(s, 1) for s in states if s is not None]) if states[0] is not None else None

    def client_state() -> dict[str, bytes] | None:
        states = {t.participant.participant_id: t.participant.personal_state() for t in edges}
        return {pid: encode_weights(s) for pid, s in states.items() if s is not None} or None

    ctx = RunContext(cfg, dataset=dataset, workbench=bench, super_nodes=super_nodes,
                     personal_layers=personal_layers)
    coordinator = Coordinator(ctx, supernodes[0], lambda: supernodes[1:], LocalEdges(edges), wait_durable=False,
                              concurrent=False, client_state=client_state)
    sim = Simulation(cfg, ctx, supernodes, edges, coordinator)
    if sim.ledger.head is not None and ctx.scenario is not None and ctx.scenario.host_gflops is None:
        recorded = sim.ledger.get_block(0)[0].header.params.get(HOST_GFLOPS)
        if isinstance(recorded, str):   # the machine rate this chain's relative devices were timed against
            ctx.pin_host_gflops(float(recorded))
    if sim.ledger.head is not None:
        try:
            _check_resumable(sim)
        except ResumeMismatch:
            sim.close()
            raise
    return sim


def _check_resumable(sim: Simulation) -> None:
    genesis, _ = sim.ledger.get_block(0)
    stored, expected = genesis.header.params, sim.coordinator.genesis_params(sim.validators)
    if stored != expected or genesis.header.algorithm != sim.ctx.strategy.name:
        diff = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        raise ResumeMismatch(f"the ledger at {sim.ledger.store.url} was started with other settings "
                             f"({', '.join(diff) or 'algorithm'}); pass --fresh to start over or use another --db")


def _restore_clients(sim: Simulation) -> int:
    """Put back every client's personal layers stored with the head block; return the next round."""
    head = sim.ledger.head
    assert head is not None
    if any(t.participant.personal_keys for t in sim.edges):
        states = sim.ledger.store.client_states()
        for t in sim.edges:
            pid = t.participant.participant_id
            height, blob = states.get(pid, (None, b""))
            if height != head.height:
                raise ResumeMismatch(f"personal layers of {pid} are missing for block {head.height}; "
                                     "pass --fresh to start over")
            t.participant.set_personal_state(decode_weights(blob))
    return head.round + 1


def simulate(cfg: Config, *, fresh: bool = False, out_dir: str | None = None, progress: bool = True,
             super_nodes: int = 1, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the simulation up to ``cfg.rounds`` rounds; return the summary."""
    started = time.perf_counter()
    bar: tqdm | None = None
    sim = prepare(cfg, fresh, super_nodes, on_fit=lambda: bar.update(1) if bar is not None else None)
    # What is loaded now (modules, the dataset, the model) lives to the end: keep the collector from walking it
    # again at every collection of the run.
    gc.freeze()
    ledger, ctx = sim.ledger, sim.ctx
    try:
        emit(f"data: {ctx.dataset.source}; {cfg.clients} clients ({cfg.partition}) on {super_nodes} super "
             f"node{'s' if super_nodes > 1 else ''}, {cfg.algo}, model {model_name(cfg)}; ledger {ledger.store.url}")
        if cfg.attack is not None:   # the malicious edge nodes edge_cores drew from the run's seed
            attackers = [(t.participant.participant_id, t.attack.spec.text()) for t in sim.edges if t.attack]
            emit(f"attackers: {len(attackers)} of {len(sim.edges)} edge nodes run "
                 f"{attackers[0][1] if attackers else cfg.attack} (drawn from seed {cfg.seed}): "
                 f"{', '.join(pid for pid, _ in attackers)}")
        if ledger.head is None:
            _, metrics = sim.coordinator.genesis(edges=LocalEdges(sim.edges).edges(), validators=sim.validators)
            first = 1
            emit(f"genesis: initial model, accuracy {metrics.get('accuracy', float('nan')):.2%}")
        else:
            first = _restore_clients(sim)
            emit(f"resuming after block {ledger.head.height} (round {first - 1})")
        rows: list[dict[str, Any]] = []
        timeline: list[dict[str, Any]] = []
        ids = [t.node_id for t in sim.edges]
        for rnd in range(first, cfg.rounds + 1):
            if progress:
                # Under a scenario the plan decides who trains; the bar then counts without a total.
                total = len(ctx.strategy.select(rnd, ids)) if ctx.scenario is None else None
                bar = tqdm(total=total, desc=f"round {rnd}", leave=False,
                           disable=None)
            report = _run_round(sim, rnd, timeline, emit)
            if bar is not None:
                bar.close()
                bar = None
            seconds = report.timings["round_s"]
            row = {"round": rnd, "seconds": round(seconds, 3), "clients": report.participants,
                   "failures": len(report.failures), "excluded": len(report.excluded),
                   "combine_s": round(report.timings.get("combine_s", 0.0), 4), **report.metrics}
            if report.sim is not None:
                row.update(sim_round_s=round(report.sim.round_s, 3), sim_time_s=round(report.sim.end_s, 3),
                           dropped=len(report.dropped), available=report.sim.available)
                timeline.append(report.sim.row())
            rows.append(row)
            emit(_round_line(report, cfg.rounds))
        for sn in sim.supernodes:
            sn.ledger.flush()
            if not sn.ledger.healthy:   # a block the simulator did not wait for failed to write
                raise WriterFailed(f"the ledger of super node {sn.node_id} failed to write: "
                                   f"{sn.ledger.health_reason}; its durable head is "
                                   f"{sn.ledger.durable_head.height if sn.ledger.durable_head else 'empty'}")
        head = ledger.head
        assert head is not None
        result = {"rounds": head.round, "rounds_run": len(rows),
                  "final_accuracy": rows[-1].get("accuracy") if rows else None,
                  "wall_s": round(time.perf_counter() - started, 3), "head_height": head.height,
                  "head_hash": head.hash, "db": ledger.store.url, "dataset": ctx.dataset.source, "algo": cfg.algo,
                  "super_nodes": super_nodes, "round_seconds": [row["seconds"] for row in rows],
                  "combine_seconds": [row["combine_s"] for row in rows],
                  "aggregate": ctx.plan().aggregate,
                  "attackers": [t.participant.participant_id for t in sim.edges if t.attack is not None]}
        if super_nodes > 1:
            result["heads"] = [sn.ledger.head.hash if sn.ledger.head else None for sn in sim.supernodes]
        if ctx.scenario is not None:
            clock = ctx.clock()
            assert clock is not None
            result.update(scenario=ctx.scenario.source, sim_time_s=round(clock.now_s, 3),
                          sim_round_seconds=[row.get("sim_round_s") for row in rows],
                          dropped=sum(row.get("dropped", 0) for row in rows))
            if ctx.scenario.needs_host_rate:
                result["host_gflops"] = ctx.scenario.host_gflops
        if rows and ctx.strategy.name == "fedper":
            result["final_personal_accuracy_mean"] = rows[-1].get("personal_accuracy_mean")
        if out_dir:
            write_outputs(Path(out_dir), rows, result, timeline if ctx.scenario is not None else None)
        return result
    finally:
        sim.close()


MAX_EMPTY_TRIES = 100   # rounds in a row with nobody to train before the simulation gives up


def _run_round(sim: Simulation, rnd: int, timeline: list[dict[str, Any]],
               emit: Callable[[str], None]) -> RoundReport:
    """One round; under a scenario, a round with nobody to train (everyone offline, late or not online) moves the
    virtual clock on and is tried again, up to MAX_EMPTY_TRIES times in a row."""
    for _ in range(MAX_EMPTY_TRIES):
        try:
            return sim.coordinator.run_round(rnd)
        except EmptyRound as exc:
            clock = sim.ctx.clock()
            assert clock is not None
            timeline.append({"round": rnd, "start_s": None, "round_s": None, "empty": True,
                             "end_s": round(clock.now_s, 3), "reason": str(exc)})
            emit(f"round {rnd}: nobody could train ({exc}); the simulated clock moves on to {clock.now_s:.1f} s")
    raise RoundFailed(rnd, [("scenario", f"no edge node could train in {MAX_EMPTY_TRIES} tries; raise [round] "
                                         "deadline_s, or choose faster devices, links or longer availability")])


def _round_line(report: RoundReport, total: int) -> str:
    m = report.metrics
    parts = [f"round {report.round}/{total}"]
    if "accuracy" in m:
        parts.append(f"accuracy {m['accuracy']:.2%} loss {m['loss']:.4f}")
    if "personal_accuracy_mean" in m:
        parts.append(f"personal accuracy mean {m['personal_accuracy_mean']:.2%} "
                     f"(min {m['personal_accuracy_min']:.2%}, max {m['personal_accuracy_max']:.2%})")
    if report.failures:
        parts.append(f"{len(report.failures)} failed")
    if report.excluded:
        names = ("  " + "; ".join(f"{edge[:12]} ({why[:60]})" for edge, why in report.excluded)
                 if len(report.excluded) <= 3 else "")
        parts.append(f"{len(report.excluded)} excluded{names}")
    if report.dropped:
        parts.append(f"{len(report.dropped)} dropped")
    if report.sim is not None:
        parts.append(f"sim {report.sim.round_s:.1f} s (clock {format_clock(report.sim.end_s)})")
    block = report.block
    parts.append(f"{report.timings['round_s']:.2f} s  block {block.header.height} {block.hash[:12]}")
    return "  ".join(parts)


def format_clock(seconds: float) -> str:
    """Simulated time as h:mm:ss."""
    whole = int(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


def write_outputs(out: Path, rows: list[dict[str, Any]], result: dict[str, Any],
                  timeline: list[dict[str, Any]] | None = None) -> None:
    """metrics.csv, metrics.json and plot.svg (accuracy and loss per round, and against simulated time under a
    scenario) in ``out``; under a scenario also timeline.json and timeline.svg (who trained, who was dropped and
    why, round by round)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "round", k))
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "metrics.json").write_text(json.dumps({"summary": result, "rounds": rows}, indent=2) + "\n")
    (out / "plot.svg").write_text(svg_chart(rows))
    if timeline is not None:
        (out / "timeline.json").write_text(json.dumps(timeline, indent=1) + "\n")
        (out / "timeline.svg").write_text(svg_timeline([t for t in timeline if not t.get("empty")]))
