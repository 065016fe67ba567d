"""Workload W1: the plain PyTorch FedAvg loop vs `main.py simulate` with the SQLite and the MariaDB ledger.

Runs each as a separate process `--repeat` times (interleaved, so machine noise hits all alike) and prints the
per-run and median wall times (whole process, imports included, and the run's own timer), the ratios to the
plain loop, and the final accuracies. Usage:

    python bench/bench_simulate.py [--repeat 3] [--rounds 10] [--mysql URL] [--skip-mysql]
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MYSQL = "mysql+pymysql://root:@127.0.0.1:3306/fledger_bench_w1?charset=utf8mb4"


def run(cmd: list[str]) -> tuple[float, dict]:
    """Run a command from the repository root; (wall seconds, the JSON object on its last output line)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-1500:]}\n{proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mysql", default=os.environ.get("FLEDGER_TEST_MYSQL_URL") and DEFAULT_MYSQL or DEFAULT_MYSQL)
    parser.add_argument("--skip-mysql", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fledger-w1-"))
    w1 = ["--rounds", str(args.rounds), "--clients", "10", "--partition", "iid", "--local-epochs", "1",
          "--batch-size", "32", "--lr", "0.05", "--momentum", "0", "--fraction", "1", "--seed", "0",
          "--threads", "2", "--fresh", "--no-progress", "--json"]
    variants = {
        "plain": [sys.executable, "bench/plain_fedavg.py", "--rounds", str(args.rounds), "--json"],
        # {i}: every run gets an empty data root, as the first one does; with a reused root, --fresh would also time
        # deleting the previous run's chain (~70 MB of weights), which is not part of W1
        "sqlite": [sys.executable, "main.py", "simulate", *w1, "--data-root", str(work / "sqlite-{i}")],
    }
    if not args.skip_mysql:
        variants["mariadb"] = [sys.executable, "main.py", "simulate", *w1, "--data-root", str(work / "mysql"),
                               "--db", args.mysql]
    results: dict[str, list[tuple[float, dict]]] = {name: [] for name in variants}
    for i in range(args.repeat):
        for name, cmd in variants.items():
            wall, out = run([part.replace("{i}", str(i + 1)) for part in cmd])
            results[name].append((wall, out))
            print(f"run {i + 1} {name:8s} process {wall:6.2f} s  own timer {out['wall_s']:6.2f} s  "
                  f"final accuracy {out['final_accuracy']:.4f}", flush=True)
    medians = {name: (statistics.median(w for w, _ in rs), statistics.median(o["wall_s"] for _, o in rs))
               for name, rs in results.items()}
    print("\nmedians over", args.repeat, "runs (process wall / own timer):")
    for name, (proc_wall, own) in medians.items():
        ratio = proc_wall / medians["plain"][0]
        ratio_own = own / medians["plain"][1]
        acc = results[name][0][1]["final_accuracy"]
        print(f"  {name:8s} {proc_wall:6.2f} s / {own:6.2f} s   ratio to plain {ratio:.3f} / {ratio_own:.3f}   "
              f"final accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
