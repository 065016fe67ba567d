"""Attacks against aggregation rules in the simulator: final accuracy per cell, the round-time cost of each rule,
how robustness composes across super nodes, and what recorded updates cost.

Every cell is one `simulate` run on the offline MNIST sample: 20 edge nodes on 2 super nodes, every edge node
every round, E=1, B=32, lr=0.05, seed 0, IID or Dirichlet(0.5) shares; attackers 0, 10, 20 and 30% (drawn from the
seed) running each attack of fl.attacks against each rule. Parts (``--part``, default all):

- ``grid``: the accuracy table (``--model``, default the 2NN so the whole grid fits in a session on two cores;
  ``--rounds`` 20);
- ``cost``: median round time of each rule, and of the proposer's combine step where it runs, against plain
  FedAvg (averaged per super node, nothing forwarded), on the McMahan CNN, IID, no attackers, ``--cost-rounds``
  rounds per run, ``--repeat`` runs with the rules taking turns;
- ``compose``: from the updates recorded in the last round of a 5-round, 30%-attack run under the median (2 super
  nodes, edge i on super node i mod 2), the rule over all updates at the proposer ("flat", what fledger does)
  against the rule per super node and again over the super nodes' results ("tiered"): test accuracy of each
  one-round aggregate and its distance from the honest mean, from the same base and the same updates;
- ``record``: a 20-round chain with recorded updates (CNN and 2NN): the bytes the updates add per round and the
  time of `verify --recompute`.

Usage:

    python bench/bench_attacks.py [--part grid,cost,compose,record] [--workers 2] [--cells N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ATTACKS = ("label-flip", "sign-flip:scale=10", "scale:factor=10", "noise:sigma=0.1", "nan", "free-ride", "stale",
           "alie")
# clip: about 1.5x the median honest update norm of the 2NN here (0.25-0.36 in rounds 1-3)
RULES = ("fedavg", "median", "trimmed-mean:beta=0.3", "multi-krum", "clip:norm=0.5")
FRACTIONS = (0.0, 0.1, 0.2, 0.3)
PARTITIONS = ("iid", "dirichlet")


def base_config(root: Path, **over: Any):
    from config import Config
    cfg = Config(dataset="mnist", clients=20, rounds=20, threads=1, reproducible=True, data_root=str(root), seed=0,
                 retry_for_s=0.0, eval_global=True)
    return replace(cfg, **over)


def run_cell(cell: dict[str, Any]) -> dict[str, Any]:
    """One simulate run in a fresh temporary data root; its summary figures."""
    from node.sim.simulator import simulate
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="fledger-bench-") as tmp:
        over = {k: v for k, v in cell.items() if k not in ("label",)}
        cfg = base_config(Path(tmp), **over)
        started = time.perf_counter()
        try:
            result = simulate(cfg, fresh=True, progress=False, emit=lambda *_: None, super_nodes=2)
        except Exception as exc:   # a rule that cannot run (too few updates) is a result too
            return {**cell, "error": f"{type(exc).__name__}: {exc}"[:300]}
        return {**cell, "accuracy": result["final_accuracy"], "wall_s": time.perf_counter() - started,
                "round_s": statistics.median(result["round_seconds"][1:] or result["round_seconds"]),
                "combine_s": statistics.median(result["combine_seconds"][1:] or result["combine_seconds"])}


def grid_cells(model: str, rounds: int) -> list[dict[str, Any]]:
    cells = []
    for partition in PARTITIONS:
        for rule in RULES:
            cells.append({"partition": partition, "aggregate": rule, "attack": None, "attackers": 0.0,
                          "model": model, "rounds": rounds})
            for fraction in FRACTIONS[1:]:
                for attack in ATTACKS:
                    cells.append({"partition": partition, "aggregate": rule, "attack": attack,
                                  "attackers": fraction, "model": model, "rounds": rounds})
    return cells


def run_all(cells: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [run_cell(c) for c in cells]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        done = []
        for i, result in enumerate(pool.map(run_cell, cells)):
            done.append(result)
            print(f"  [{i + 1}/{len(cells)}] {_label(result)}: {result.get('accuracy', result.get('error'))}",
                  file=sys.stderr, flush=True)
        return done


def _label(cell: dict[str, Any]) -> str:
    return f"{cell['partition']} {cell['aggregate']} {cell.get('attack') or 'clean'} {cell['attackers']:.0%}"


def print_grid(results: list[dict[str, Any]]) -> None:
    clean = {(r["partition"], r["aggregate"]): r.get("accuracy") for r in results if not r["attack"]}
    for partition in PARTITIONS:
        print(f"\n### {partition}: final accuracy after the last round (clean FedAvg "
              f"{_pct(clean.get((partition, 'fedavg')))})\n")
        print("| attackers | attack | " + " | ".join(RULES) + " | best | best vs clean FedAvg |")
        print("|---|---|" + "---|" * (len(RULES) + 2))
        print("| 0% | none | " + " | ".join(_pct(clean.get((partition, rule))) for rule in RULES) + " | | |")
        for fraction in FRACTIONS[1:]:
            for attack in ATTACKS:
                row = {r["aggregate"]: r for r in results if r["partition"] == partition and r["attack"] == attack
                       and r["attackers"] == fraction}
                accs = {rule: row[rule].get("accuracy") for rule in RULES if rule in row}
                scored = {k: v for k, v in accs.items() if isinstance(v, float)}
                best = max(scored, key=lambda k: scored[k]) if scored else None
                base = clean.get((partition, "fedavg"))
                gap = (f"{(scored[best] - base) * 100:+.1f} pts" if best and isinstance(base, float) else "")
                print(f"| {fraction:.0%} | {attack} | " + " | ".join(_cell(row.get(rule)) for rule in RULES)
                      + f" | {best or ''} | {gap} |")


def _pct(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, float) else "-"


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    if "error" in result:
        return "fails"
    return _pct(result.get("accuracy"))


def cost(rounds: int, repeat: int) -> list[dict[str, Any]]:
    """Per rule (CNN, IID, clean): the median round time and the median time of the proposer's combine step (where
    the rule runs, with validation), against plain FedAvg; the rules take turns within each repeat."""
    names = ("fedavg-plain", *RULES)
    rounds_s: dict[str, list[float]] = {name: [] for name in names}
    combine_s: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeat):
        for name in names:
            over = {"model": "cnn", "rounds": rounds, "partition": "iid", "attack": None, "attackers": 0.0,
                    "aggregate": "fedavg" if name == "fedavg-plain" else name}
            result = run_cell(over)
            rounds_s[name].append(result["round_s"])
            combine_s[name].append(result["combine_s"])
    rows = [{"rule": name, "round_s": statistics.median(rounds_s[name]), "runs": rounds_s[name],
             "combine_s": statistics.median(combine_s[name])} for name in names]
    plain = rows[0]
    print("\n| rule | median round (s) | runs | ratio to plain FedAvg | combine step (s) |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['rule']} | {row['round_s']:.3f} | {', '.join(f'{t:.3f}' for t in row['runs'])} | "
              f"{row['round_s'] / plain['round_s']:.3f}x | {row['combine_s']:.3f} |")
    return rows


def compose(model: str) -> list[dict[str, Any]]:
    """Flat against tiered robust aggregation over the same recorded updates (see the module docstring). Each
    attack runs 5 rounds at 30% attackers under the coordinate median (so the base of the last round is a sane
    model) with every update recorded; from the last round's base and updates each rule is applied both ways.
    Reported: the test accuracy of the one-round aggregate, and its L2 distance from the honest edge nodes'
    sample-weighted mean (the aggregate an attack-free round would have had)."""
    import numpy as np

    from chain.tensors import decode_weights
    from chain.updates import REFUSED
    from fl.aggregate import weighted_average
    from fl.attacks import choose_attackers
    from fl.robust import aggregate, parse_rule
    from node.run import RunContext
    from node.sim.simulator import simulate
    from storage.store import LedgerStore
    rows = []
    for attack in ATTACKS:
        with tempfile.TemporaryDirectory(prefix="fledger-compose-") as tmp:
            cfg = base_config(Path(tmp), model=model, rounds=5, attack=attack, attackers=0.3, aggregate="median",
                              record_updates=True)
            result = simulate(cfg, fresh=True, progress=False, emit=lambda *_: None, super_nodes=2)
            store = LedgerStore(result["db"])
            try:
                head = result["head_height"]
                block = next(store.blocks(head, head))
                base = store.load_weights(head - 1)
            finally:
                store.close()
        ctx = RunContext(cfg)
        bad = set(choose_attackers(cfg.seed, cfg.clients, cfg.attackers))
        # every edge trains every round and every update is recorded in share order, so an update's position is
        # its edge's share, and share i sits on super node i mod 2
        valid = [(i, decode_weights(u.blob), u.record.record.samples) for i, u in enumerate(block.updates)
                 if u.status != REFUSED]
        honest = weighted_average([(w, n) for i, w, n in valid if i not in bad])

        def distance(weights: dict[str, Any], honest: dict[str, Any] = honest) -> float:
            return float(np.sqrt(sum(np.sum((weights[k].astype(np.float64) - honest[k].astype(np.float64)) ** 2)
                                     for k in honest)))

        for spec in RULES[1:4]:
            rule = parse_rule(spec)
            flat = aggregate(rule, base, [(w, n) for _, w, n in valid]).weights
            groups = [[(w, n) for i, w, n in valid if i % 2 == g] for g in (0, 1)]
            per_sn = [(aggregate(rule, base, g).weights, sum(n for _, n in g)) for g in groups if g]
            try:
                tiered = aggregate(rule, base, per_sn).weights
                how = spec
            except ValueError:   # Multi-Krum cannot run over two results: average them
                tiered, how = weighted_average(per_sn), "mean"
            rows.append({"attack": attack, "rule": spec, "across": how,
                         "flat": ctx.evaluate_global({**base, **flat})["accuracy"],
                         "tiered": ctx.evaluate_global({**base, **tiered})["accuracy"],
                         "flat_distance": distance(flat), "tiered_distance": distance(tiered)})
    print("\n| attack (30%) | rule | flat (fledger): accuracy, distance | tiered (rule per super node, then "
          "across): accuracy, distance |\n|---|---|---|---|")
    for row in rows:
        across = "" if row["across"] == row["rule"] else f" (across: {row['across']})"
        print(f"| {row['attack']} | {row['rule']} | {row['flat']:.2%}, {row['flat_distance']:.3f} | "
              f"{row['tiered']:.2%}, {row['tiered_distance']:.3f}{across} |")
    return rows


def record(models: Iterable[str]) -> list[dict[str, Any]]:
    """Bytes the recorded updates add per round and the time of `verify --recompute` on a 20-round chain."""
    from chain.updates import UPDATES_ROOT
    from node.sim.simulator import simulate
    from storage.store import LedgerStore
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory(prefix="fledger-record-") as tmp:
            sizes = {}
            for recorded in (False, True):
                root = Path(tmp) / ("recorded" if recorded else "plain")
                cfg = base_config(root, model=model, rounds=20, record_updates=recorded, aggregate="median")
                result = simulate(cfg, fresh=True, progress=False, emit=lambda *_: None, super_nodes=2)
                sizes[recorded] = sum(f.stat().st_size for f in root.rglob("*.db"))
                db = result["db"]
            store = LedgerStore(db)
            try:
                last = next(store.blocks(result["head_height"], result["head_height"]))
                assert UPDATES_ROOT in last.header.params
                blob = sum(len(u.blob) for u in last.updates)
            finally:
                store.close()
            times = []
            for _ in range(3):
                started = time.perf_counter()
                done = subprocess.run([sys.executable, "main.py", "verify", "--db", db, "--recompute"], cwd=ROOT,
                                      capture_output=True, text=True)
                times.append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise RuntimeError(done.stdout + done.stderr)
            rows.append({"model": model, "update_bytes_per_round": blob,
                         "ledger_growth_per_round": (sizes[True] - sizes[False]) / 20,
                         "verify_recompute_s": statistics.median(times), "runs": times,
                         "output": done.stdout.strip().splitlines()[-1]})
    print("\n| model | updates per round (blobs) | ledger growth per round (both super nodes) | "
          "verify --recompute, median of 3 (s) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['update_bytes_per_round'] / 1e6:.1f} MB | "
              f"{row['ledger_growth_per_round'] / 1e6:.1f} MB | {row['verify_recompute_s']:.1f} "
              f"({', '.join(f'{t:.1f}' for t in row['runs'])}) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="grid,cost,compose,record")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="2nn")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cost-rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cells", type=int, default=0, help="run only the first N grid cells (a smoke test)")
    parser.add_argument("--out", default="bench-attacks.json")
    args = parser.parse_args()
    parts = set(args.part.split(","))
    out: dict[str, Any] = {}
    if "grid" in parts:
        cells = grid_cells(args.model, args.rounds)
        out["grid"] = run_all(cells[:args.cells] if args.cells else cells, args.workers)
        print_grid(out["grid"])
    if "cost" in parts:
        out["cost"] = cost(args.cost_rounds, args.repeat)
    if "compose" in parts:
        out["compose"] = compose(args.model)
    if "record" in parts:
        out["record"] = record(("2nn", "cnn"))
    Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
