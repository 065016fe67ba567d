"""Scenario runs in the simulator at scale: where the wall time goes and how much memory it takes.

Two settings (``--setting``):

- ``scale``: 1,000 edge nodes, 100 per round (fraction 0.1), each with 40 images of the offline MNIST sample drawn
  with overlap (``--share-size 40``: 4,000 images cannot give 1,000 disjoint shares of 40), the MNIST CNN, two super
  nodes, a scenario of mixed devices and links (phones on 4G that come and go, Raspberry Pis on Wi-Fi, laptops,
  a few Pi 3s on 3G), a 120 s deadline and over-commitment 1.3. Target: peak memory at most 1.5 GB, and
  everything but local training and evaluation at most 5% of the wall time.
- ``fbp``: the ledgered-FL setting of FedBlockParadox (55 nodes, MNIST, 100 rounds): 5 super nodes (every block
  co-signed by a majority of 5 validators) and 50 edge nodes on the offline MNIST sample, 30% of them attacking
  (sign-flip, scale 5) against the coordinate-wise median, Raspberry Pi 4s on the Wi-Fi profile. Goal: at most
  1 hour and 4 GB on a 2-core machine; reports the simulated time to reach 90% accuracy.

The split comes from timers around every local training (``InProcessParticipant.fit``) and every evaluation
(global: ``RunContext.evaluate_global``; personalised: ``InProcessParticipant.evaluate``); the rest is everything
else (start-up, planning, selection, signing, aggregation, hashing, the ledgers' writes, co-signing), also broken
down by the coordinator's own per-round timings. Peak memory is this process's maximum resident set (ru_maxrss).

    python bench/bench_scenario_sim.py --setting scale [--rounds 20] [--repeat 3] [--profile]
    python bench/bench_scenario_sim.py --setting fbp [--rounds 100]

``--repeat N`` runs the setting N times, each in a process of its own, interleaved with the same setting without
the scenario (``plain``: the same clients, selection and rule, no virtual clock), and prints the medians and the
ratios scenario / plain: what planning rounds on the clock costs.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCALE = """
[network]
super_nodes = 2
edge_nodes = 1000
[defaults]
device = "rpi4"
link = "wifi"
[[edges]]
select = "0-399"
device = "phone"
link = "4g"
availability = { mean_on_s = 1800, mean_off_s = 600 }
[[edges]]
select = "700-899"
device = "laptop"
[[edges]]
select = "900-999"
device = "rpi3"
link = "3g"
[links]
backbone = "lan"
[round]
deadline_s = 120
overcommit = 1.3
"""

FBP = """
[network]
super_nodes = 5
edge_nodes = 50
[defaults]
device = "rpi4"
link = "wifi"
[links]
backbone = "lan"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("scale", "fbp"), default="scale")
    parser.add_argument("--rounds", type=int, help="default: 20 (scale), 100 (fbp)")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top functions outside training")
    parser.add_argument("--out", help="keep the run's folder here (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=0, help="N runs with and without the scenario, interleaved")
    parser.add_argument("--plain", action="store_true", help="the same setting without the scenario")
    parser.add_argument("--share-size", type=int, default=40, help="scale: images per edge node (default 40)")
    args = parser.parse_args()
    if args.repeat:
        return compare(args)

    from config import Config
    from fl.local import InProcessParticipant
    from node.run import RunContext
    from node.sim.simulator import simulate

    spent: dict[str, float] = defaultdict(float)

    def timed(kind: str, fn: Any) -> Any:
        def wrapper(*a: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[kind] += time.perf_counter() - start
        return wrapper

    InProcessParticipant.fit = timed("train", InProcessParticipant.fit)                 # type: ignore[method-assign]
    InProcessParticipant.evaluate = timed("evaluate", InProcessParticipant.evaluate)     # type: ignore[method-assign]
    RunContext.evaluate_global = timed("evaluate", RunContext.evaluate_global)           # type: ignore[method-assign]
    from node.engine.coordinator import Coordinator
    from node.engine.edge import EdgeCore
    EdgeCore.fit = timed("edge_fit", EdgeCore.fit)   # training + hashing and signing the update (the edge's work)
    rounds_timings: list[dict[str, float]] = []
    run_round = Coordinator.run_round

    def recorded(self: Any, rnd: int) -> Any:
        report = run_round(self, rnd)
        rounds_timings.append(report.timings)
        return report

    Coordinator.run_round = recorded                                                     # type: ignore[method-assign]

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix=f"fledger-bench-{args.setting}-"))
    work.mkdir(parents=True, exist_ok=True)
    scenario = work / "scenario.toml"
    if args.setting == "scale":
        scenario.write_text(SCALE)
        rounds = args.rounds or 20
        cfg = Config(clients=1000, fraction=0.1, share_size=args.share_size, model="cnn", rounds=rounds, seed=0,
                     reproducible=True, scenario=str(scenario), data_root=str(work / "root"))
        super_nodes = 2
    else:
        scenario.write_text(FBP)
        rounds = args.rounds or 100
        cfg = Config(clients=50, model="cnn", rounds=rounds, seed=0, reproducible=True, scenario=str(scenario),
                     attack="sign-flip:scale=5", attackers=0.3, aggregate="median", data_root=str(work / "root"))
        super_nodes = 5
    if args.plain:
        from dataclasses import replace
        cfg = replace(cfg, scenario=None)
    profiler = cProfile.Profile() if args.profile else None
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    first_round: list[float] = []

    def emit(line: str) -> None:
        if line.startswith("genesis") and not first_round:
            first_round.append(time.perf_counter())
        print(line, flush=True)

    result = simulate(cfg, fresh=True, out_dir=str(work / "out"), progress=False, super_nodes=super_nodes,
                      emit=emit)
    if profiler is not None:
        profiler.disable()
    wall = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows = json.loads((work / "out" / "metrics.json").read_text())["rounds"]
    other = wall - spent["train"] - spent["evaluate"]
    startup = (first_round[0] if first_round else started) - started
    print(f"\nsetting {args.setting}: {cfg.clients} edge nodes, {super_nodes} super nodes, {len(rows)} rounds; "
          f"command: python bench/bench_scenario_sim.py --setting {args.setting} --rounds {rounds}"
          + (f" --share-size {args.share_size}" if args.setting == "scale" else ""))
    print(f"wall {wall:.1f} s = local training {spent['train']:.1f} s ({spent['train'] / wall:.1%}) + "
          f"evaluation {spent['evaluate']:.1f} s ({spent['evaluate'] / wall:.1%}) + everything else "
          f"{other:.1f} s ({other / wall:.1%})")
    edge_other = spent["edge_fit"] - spent["train"]
    print(f"  of everything else: the edge nodes hashing and signing their updates {edge_other:.1f} s "
          f"({edge_other / wall:.1%}); start-up until the first round {startup:.1f} s ({startup / wall:.1%}); "
          f"the rest {other - edge_other - startup:.1f} s ({(other - edge_other - startup) / wall:.1%})")
    keys = ("select_s", "partials_s", "combine_s", "evaluate_s", "block_s", "cosign_s", "store_s", "commit_s")
    print("  per round, median s: " + "  ".join(
        f"{k[:-2]} {statistics.median(t.get(k, 0.0) for t in rounds_timings):.3f}" for k in keys))
    print(f"peak memory (max RSS) {peak_mib:.0f} MiB")
    sim_time = result.get("sim_time_s", 0.0)
    print(f"simulated time {sim_time:.0f} s ({sim_time / 3600:.2f} h); "
          f"{result.get('dropped', 0)} edge node rounds dropped; final accuracy {result['final_accuracy']:.2%}")
    reached = next((r for r in rows if r.get("accuracy", 0.0) >= 0.9), None)
    if reached is not None and "sim_time_s" in reached:
        print(f"90% accuracy first at round {reached['round']}, simulated time {reached['sim_time_s']:.0f} s "
              f"({reached['sim_time_s'] / 60:.1f} min)")
    else:
        print("90% accuracy not reached")
    if profiler is not None:
        print("\ncProfile, cumulative, top 25 (training and evaluation included; read 'everything else' off it):")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        print("\ncProfile, own time, top 40:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(40)
    print(json.dumps({"setting": args.setting, "wall_s": round(wall, 2), "train_s": round(spent["train"], 2),
                      "evaluate_s": round(spent["evaluate"], 2), "other_s": round(other, 2),
                      "other_share": round(other / wall, 4), "peak_rss_mib": round(peak_mib),
                      "edge_sign_s": round(spent["edge_fit"] - spent["train"], 2), "startup_s": round(startup, 2),
                      "sim_time_s": sim_time, "rounds": len(rows),
                      "final_accuracy": result["final_accuracy"],
                      "sim_time_to_90_s": reached.get("sim_time_s") if reached else None,
                      "round_to_90": reached["round"] if reached else None}))
    return 0


def compare(args: argparse.Namespace) -> int:
    """Interleaved runs of the setting with and without the scenario, each in its own process; medians, ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"scenario": [], "plain": []}
    rounds = ["--rounds", str(args.rounds)] if args.rounds else []
    for i in range(args.repeat):
        for variant in ("scenario", "plain"):
            cmd = [sys.executable, __file__, "--setting", args.setting, *rounds] + (["--plain"] if variant == "plain"
                                                                                  else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[variant].append(out)
            print(f"run {i + 1} {variant:8s} wall {out['wall_s']:7.1f} s  training {out['train_s']:7.1f} s  "
                  f"evaluation {out['evaluate_s']:5.1f} s  else {out['other_s']:6.1f} s ({out['other_share']:.1%})  "
                  f"peak {out['peak_rss_mib']} MiB", flush=True)
    print(f"\nmedians over {args.repeat} runs (command: python bench/bench_scenario_sim.py --setting {args.setting} "
          f"{' '.join(rounds)} --repeat {args.repeat}):")
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "train_s", "evaluate_s", "other_s",
                                                               "other_share", "peak_rss_mib", "edge_sign_s",
                                                               "startup_s")}
           for v, rs in runs.items()}
    for variant, m in med.items():
        print(f"  {variant:8s} wall {m['wall_s']:7.1f} s  training {m['train_s']:7.1f} s  evaluation "
              f"{m['evaluate_s']:5.1f} s  everything else {m['other_s']:6.1f} s ({m['other_share']:.1%}: edge "
              f"nodes hashing and signing {m['edge_sign_s']:.1f} s, start-up {m['startup_s']:.1f} s)  "
              f"peak {m['peak_rss_mib']:.0f} MiB")
    print(f"  ratio scenario / plain: wall {med['scenario']['wall_s'] / med['plain']['wall_s']:.3f}, everything else "
          f"{med['scenario']['other_s'] / med['plain']['other_s']:.3f}, peak memory "
          f"{med['scenario']['peak_rss_mib'] / med['plain']['peak_rss_mib']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
