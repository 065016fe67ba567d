"""The same scenario on the real network and in the simulator: measured round times against the virtual clock.

For each link profile (``--links lan,wifi,4g``) a scenario of 2 super nodes and 4 edge nodes (Raspberry Pi 4s on
that link, a LAN backbone) runs as `main.py cluster --scenario FILE` (separate processes on loopback, secure mode;
every node spends its profile's time for real: node/engine/pacing.py) and as `main.py simulate --scenario FILE
--sn 2` (in one process, no waiting). Per round it prints the network's measured round time, the same without
the proposer's global evaluation (an experimenter's measurement on a held-out test set that the time model does
not count: README "Scenarios"), the plan the network's proposer made (``sim_round_s``) and the simulator's
prediction for that round, and the ratios; then the medians over rounds 2..N (round 1 pays one-off costs: first
connections, lazy loads).

    python bench/bench_scenario_net.py [--links lan,wifi,4g] [--rounds 4] [--device rpi4]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = """
[network]
super_nodes = 2
edge_nodes = 4
[defaults]
device = "{device}"
link = "{link}"
[links]
backbone = "lan"
"""


def run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--links", default="lan,wifi,4g")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="rpi4")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fledger-bench-scenario-net-"))
    summary = []
    for link in args.links.split(","):
        scenario = work / f"{link}.toml"
        scenario.write_text(SCENARIO.format(device=args.device, link=link))
        common = ["--scenario", str(scenario), "--rounds", str(args.rounds), "--seed", "0", "--reproducible",
                  "--json"]
        net = run([sys.executable, "main.py", "cluster", *common, "--data-root", str(work / f"net-{link}")])
        sim = run([sys.executable, "main.py", "simulate", *common, "--fresh", "--no-progress",
                   "--data-root", str(work / f"sim-{link}")])
        print(f"\n{link}: {args.device} edge nodes, 2 super nodes; "
              "round  measured s  without eval s  network plan s  simulator s  ratio  ratio without eval")
        ratios, raw = [], []
        for i, timings in enumerate(net["round_timings"], start=1):
            measured, evaluation = timings["round_s"], timings.get("evaluate_s", 0.0)
            planned, predicted = timings["sim_round_s"], sim["sim_round_seconds"][i - 1]
            print(f"  {i:5d}  {measured:10.2f}  {measured - evaluation:14.2f}  {planned:14.2f}  {predicted:11.2f}  "
                  f"{measured / predicted:5.3f}  {(measured - evaluation) / predicted:5.3f}")
            if i > 1:
                raw.append(measured / predicted)
                ratios.append((measured - evaluation) / predicted)
        summary.append((link, statistics.median(raw), statistics.median(ratios), sim["sim_round_seconds"][-1]))
    print(f"\nmedians over rounds 2..{args.rounds} (measured on the network / predicted by the simulator):")
    for link, raw_ratio, ratio, predicted in summary:
        print(f"  {link:6s} predicted {predicted:6.2f} s per round   ratio {raw_ratio:.3f}   "
              f"without the proposer's evaluation {ratio:.3f}")
    print(f"command: python bench/bench_scenario_net.py --links {args.links} --rounds {args.rounds} "
          f"--device {args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
