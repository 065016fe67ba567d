"""`main.py simulate`: one process plays the aggregator and N trainers; every round becomes a signed block."""
from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from chain.tensors import decode_weights, encode_weights
from config import Config, local_test_fraction
from fl.aggregate import weighted_average
from fl.server import evaluate_personalized
from fl.train import evaluate as evaluate_model
from fl.weights import load_numpy
from node.ledger import Ledger, default_db_url
from node.rounds import SigningParticipant, integer_metrics, recorded_round
from node.setup import Federation, build_federation, configure_torch, model_name
from storage.store import LedgerStore

log = logging.getLogger(__name__)


class ResumeMismatch(ValueError):
    """The ledger was started with other settings than this run's."""


@dataclass
class Simulation:
    cfg: Config
    fed: Federation
    ledger: Ledger
    participants: list[SigningParticipant]
    run_params: dict[str, str]

    # ---- evaluation -----------------------------------------------------------------------------------------

    def evaluate(self, shared: dict[str, np.ndarray]) -> dict[str, float]:
        """Global model on the global test set; for FedPer also each client's personalised model (mean/min/max).

        FedPer has no global classifier: the global figure uses the sample-free mean of the clients' personal layers.
        """
        out: dict[str, float] = {}
        fed = self.fed
        if self.cfg.eval_global:
            state = dict(shared)
            if fed.personal_keys:
                state.update(weighted_average([(p.personal_state(), 1) for p in fed.participants]))
            with fed.workbench.lock:
                load_numpy(fed.workbench.model, state, strict_keys=True)
                m = evaluate_model(fed.workbench.model, fed.dataset.test_x, fed.dataset.test_y,
                                   device=fed.workbench.device)
            out.update(accuracy=m["accuracy"], loss=m["loss"])
        if fed.personal_keys or self.cfg.eval_local:
            pers = evaluate_personalized(fed.participants, shared)
            out.update({f"personal_accuracy_{k}": v for k, v in pers.items() if k != "count"})
        return out

    def client_state(self) -> dict[str, bytes]:
        return {p.participant_id: encode_weights(p.personal_state()) for p in self.fed.participants
                if p.personal_keys}

    def timestamp(self, round: int) -> int:
        return round * 1000 if self.cfg.reproducible else int(time.time() * 1000)


def run_params(cfg: Config, fed: Federation) -> dict[str, str]:
    """What fixes a run; stored in the genesis block so a resumed run can check it continues the same one."""
    params = dict(fed.strategy.params())
    params.update(dataset=cfg.dataset, data=fed.dataset.source, model=model_name(cfg), partition=cfg.partition,
                  alpha=repr(cfg.alpha), shards_per_client=str(cfg.shards_per_client), clients=str(cfg.clients),
                  local_test_fraction=repr(local_test_fraction(cfg)))
    return params


def prepare(cfg: Config, fresh: bool = False) -> Simulation:
    """Load data and model, open the ledger, and start a chain or check that it can be resumed."""
    device = configure_torch(cfg)
    fed = build_federation(cfg, device)
    url = cfg.db or default_db_url(cfg.data_root)
    Path(cfg.data_root).mkdir(parents=True, exist_ok=True)
    if fresh:
        store = LedgerStore(url)
        store.reset()
        store.close()
        (Path(cfg.data_root) / "checkpoint.json").unlink(missing_ok=True)
    ledger = Ledger.open(cfg.data_root, url)
    participants = [SigningParticipant(p, ledger.key.derive(p.participant_id)) for p in fed.participants]
    sim = Simulation(cfg, fed, ledger, participants, run_params(cfg, fed))
    if ledger.tip is not None:
        _check_resumable(sim)
    return sim


def _check_resumable(sim: Simulation) -> None:
    genesis, _ = sim.ledger.get_block(0)
    stored = genesis.header.params
    if stored != sim.run_params or genesis.header.algorithm != sim.fed.strategy.name:
        diff = sorted(k for k in set(stored) | set(sim.run_params) if stored.get(k) != sim.run_params.get(k))
        raise ResumeMismatch(f"the ledger at {sim.ledger.store.url} was started with other settings "
                             f"({', '.join(diff) or 'algorithm'}); pass --fresh to start over or use another --db")


def _resume_state(sim: Simulation) -> tuple[dict[str, np.ndarray], int]:
    tip = sim.ledger.tip
    weights = sim.ledger.load_weights(tip.header.height)
    if sim.fed.personal_keys:
        states = sim.ledger.store.client_states()
        for p in sim.fed.participants:
            height, blob = states.get(p.participant_id, (None, b""))
            if height != tip.header.height:
                raise ResumeMismatch(f"personal layers of {p.participant_id} are missing for block "
                                     f"{tip.header.height}; pass --fresh to start over")
            p.set_personal_state(decode_weights(blob))
    return weights, tip.header.round + 1


def simulate(cfg: Config, *, fresh: bool = False, out_dir: str | None = None, progress: bool = True,
             emit=print) -> dict[str, Any]:
    """Run (or resume) the simulation up to ``cfg.rounds`` rounds; return the summary."""
    started = time.perf_counter()
    sim = prepare(cfg, fresh)
    fed, ledger = sim.fed, sim.ledger
    try:
        emit(f"data: {fed.dataset.source}; {cfg.clients} clients ({cfg.partition}), {cfg.algo}, "
             f"model {model_name(cfg)}; ledger {ledger.store.url}")
        if ledger.tip is None:
            weights = {k: fed.initial[k] for k in fed.shared_keys}
            metrics = sim.evaluate(weights)
            ledger.propose(round=0, algorithm=fed.strategy.name, params=sim.run_params, weights=weights, records=[],
                           metrics=integer_metrics(metrics), timestamp_ms=sim.timestamp(0),
                           client_state=sim.client_state() or None)
            first = 1
            emit(f"genesis: initial model, accuracy {metrics.get('accuracy', float('nan')):.2%}")
        else:
            weights, first = _resume_state(sim)
            emit(f"resuming after block {ledger.tip.header.height} (round {first - 1})")
        rows: list[dict[str, Any]] = []
        ids = [p.participant_id for p in sim.participants]
        for rnd in range(first, cfg.rounds + 1):
            chosen = set(fed.strategy.select(rnd, ids))
            selected = [p for p in sim.participants if p.participant_id in chosen]
            bar = tqdm(total=len(selected), desc=f"round {rnd}", leave=False, disable=not progress or None)
            summary = recorded_round(
                round=rnd, participants=selected, global_weights=weights,
                ins_for=lambda i, _p, r=rnd: fed.strategy.fit_ins(r, i), ledger=ledger,
                algorithm=fed.strategy.name, params=sim.run_params, evaluate=sim.evaluate,
                timestamp_ms=sim.timestamp(rnd), client_state=sim.client_state if fed.personal_keys else None,
                on_result=lambda *_: bar.update(1))
            bar.close()
            weights = summary.weights
            rows.append({"round": rnd, "seconds": round(summary.seconds, 3), "clients": len(selected),
                         "failures": len(summary.failures), **summary.metrics})
            emit(_round_line(summary, cfg.rounds))
        ledger.flush()
        tip = ledger.tip
        result = {"rounds": tip.header.round, "rounds_run": len(rows),
                  "final_accuracy": rows[-1].get("accuracy") if rows else None,
                  "wall_s": round(time.perf_counter() - started, 3), "head_height": tip.header.height,
                  "head_hash": tip.hash, "db": ledger.store.url, "dataset": fed.dataset.source, "algo": cfg.algo,
                  "round_seconds": [row["seconds"] for row in rows]}
        if rows and fed.personal_keys:
            result["final_personal_accuracy_mean"] = rows[-1].get("personal_accuracy_mean")
        if out_dir:
            write_outputs(Path(out_dir), rows, result)
        return result
    finally:
        ledger.close()


def _round_line(s, total: int) -> str:
    m = s.metrics
    parts = [f"round {s.round}/{total}"]
    if "accuracy" in m:
        parts.append(f"accuracy {m['accuracy']:.2%} loss {m['loss']:.4f}")
    if "personal_accuracy_mean" in m:
        parts.append(f"personal accuracy mean {m['personal_accuracy_mean']:.2%} "
                     f"(min {m['personal_accuracy_min']:.2%}, max {m['personal_accuracy_max']:.2%})")
    if s.failures:
        parts.append(f"{len(s.failures)} failed")
    parts.append(f"{s.seconds:.2f} s  block {s.block.header.height} {s.block.hash[:12]}")
    return "  ".join(parts)


def write_outputs(out: Path, rows: list[dict[str, Any]], result: dict[str, Any]) -> None:
    """metrics.csv, metrics.json and plot.png (accuracy and loss per round) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    columns = sorted({k for row in rows for k in row}, key=lambda k: (k != "round", k))
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (out / "metrics.json").write_text(json.dumps({"summary": result, "rounds": rows}, indent=2) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["round"] for r in rows]
    for key, label in (("accuracy", "global"), ("personal_accuracy_mean", "personal (mean)")):
        if any(key in r for r in rows):
            ax1.plot(xs, [r.get(key) for r in rows], marker="o", label=label)
    for key, label in (("loss", "global test"), ("train_loss", "clients' training")):
        if any(key in r for r in rows):
            ax2.plot(xs, [r.get(key) for r in rows], marker="o", label=label)
    ax1.set(title="accuracy", xlabel="round")
    ax2.set(title="loss", xlabel="round")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=100)
    plt.close(fig)
