"""Network benchmarks: W1 over 1 SN + 4 EN processes vs the in-process simulator, SQLite vs MariaDB, and 50 ENs.

Each variant is a separate `main.py` process, run ``--repeat`` times, interleaved so machine noise hits all alike:

- ``sim``: `main.py simulate` with W1's settings and 4 clients (the same clients the 4 ENs hold), SQLite;
- ``net-sqlite`` / ``net-mariadb``: `main.py cluster --sn 1 --en 4` with the same settings, each node its own
  process on loopback, the SN's ledger in SQLite or in MariaDB;
- ``net-2sn``: `main.py cluster --sn 2 --en 4`, so a peer super node trains two edges, verifies, co-signs and
  stores every block;
- ``net-2sn-open``: the same in open mode (``--insecure``: no TLS, no join tokens); ``net-2sn`` and every other
  cluster variant run in secure mode (mutual TLS on every channel), the cluster's default;
- ``fifty`` (once per repeat, after the others): `main.py cluster --sn 2 --en 50 --en-per-process 10`, one round.

With ``--baseline DIR`` (a checkout of an earlier commit) every network variant also runs from that checkout,
interleaved with the current one, and the ratios current/baseline are printed.

Round times are per round (rounds 2..N: round 1 pays one-off costs such as the first gRPC connections and lazy
loads in every process), as medians per run and then the median over runs. The network's breakdown comes from
the entry's own timings of each round (see node/engine/coordinator.py Coordinator.run_round). Usage:

    python bench/bench_network.py [--repeat 3] [--rounds 10] [--mysql URL] [--skip-mysql] [--skip-fifty]
                                  [--baseline DIR] [--only NAME,NAME]

``--only net-2sn,net-2sn-open --skip-fifty`` measures what secure mode costs a round.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MYSQL = "mysql+pymysql://root:@127.0.0.1:3306/fledger_bench_net?charset=utf8mb4"
BREAKDOWN = ("edge_train_max_s", "transfer_max_s", "sn_aggregate_s", "combine_s", "evaluate_s", "block_s",
             "cosign_s", "store_s", "commit_s", "select_s")


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def run(cmd: list[str], cwd: Path = ROOT) -> tuple[float, dict]:
    """Run a command in ``cwd`` (a checkout); (wall seconds, the JSON object on its last output line)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}) in {cwd}: {' '.join(cmd)}\n{proc.stdout[-1500:]}\n"
                 f"{proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--mysql", default=DEFAULT_MYSQL)
    parser.add_argument("--skip-mysql", action="store_true")
    parser.add_argument("--skip-fifty", action="store_true")
    parser.add_argument("--baseline", type=Path, help="a checkout of an earlier commit to compare the network with")
    parser.add_argument("--only", help="comma-separated variants to run (default: all)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fledger-net-"))
    w1 = ["--rounds", str(args.rounds), "--partition", "iid", "--local-epochs", "1", "--batch-size", "32",
          "--lr", "0.05", "--momentum", "0", "--fraction", "1", "--seed", "0"]
    variants = {
        "sim": [sys.executable, "main.py", "simulate", *w1, "--clients", "4", "--threads", "2", "--fresh",
                "--no-progress", "--json", "--data-root", str(work / "sim")],
        "net-sqlite": [sys.executable, "main.py", "cluster", *w1, "--sn", "1", "--en", "4", "--json",
                       "--data-root", str(work / "net-sqlite")],
        "net-2sn": [sys.executable, "main.py", "cluster", *w1, "--sn", "2", "--en", "4", "--json",
                    "--data-root", str(work / "net-2sn")],
        "net-2sn-open": [sys.executable, "main.py", "cluster", *w1, "--sn", "2", "--en", "4", "--json",
                         "--insecure", "--data-root", str(work / "net-2sn-open")],
    }
    if not args.skip_mysql:
        variants["net-mariadb"] = [sys.executable, "main.py", "cluster", *w1, "--sn", "1", "--en", "4", "--json",
                                   "--data-root", str(work / "net-mariadb"), "--db", args.mysql]
    fifty = [sys.executable, "main.py", "cluster", *w1[2:], "--rounds", "1", "--sn", "2", "--en", "50",
             "--en-per-process", "10", "--json", "--data-root", str(work / "fifty")]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(variants)
        if unknown:
            sys.exit(f"--only: unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(variants)}")
        variants = {name: cmd for name, cmd in variants.items() if name in wanted}

    runs = [(name, cmd, ROOT) for name, cmd in variants.items()]
    if args.baseline:
        runs += [(f"{name}@base", [*cmd[:-1], cmd[-1] + "-base"], args.baseline.resolve())
                 for name, cmd in variants.items() if name != "sim"]
    per_round: dict[str, list[float]] = {name: [] for name, _, _ in runs}   # per-run medians of rounds 2..N
    # per network variant, per-run medians of each timing
    breakdown: dict[str, dict[str, list[float]]] = {name: {key: [] for key in BREAKDOWN} for name, _, _ in runs}
    accuracy: dict[str, float] = {}
    fifty_runs = []
    for i in range(args.repeat):
        for name, cmd, cwd in runs:
            wall, out = run(cmd, cwd)
            if name == "sim":
                rounds = out["round_seconds"][1:]
            else:
                rounds = [t["round_s"] for t in out["round_timings"][1:]]
                for key in BREAKDOWN:
                    breakdown[name][key].append(median(t.get(key, 0.0) for t in out["round_timings"][1:]))
                edges = {k: v for k, v in out["peak_rss_mib"].items() if k.startswith("en")}
                print(f"    peak RSS: SN {out['peak_rss_mib']['sn0']} MiB, EN processes "
                      f"{min(edges.values())}-{max(edges.values())} MiB", flush=True)
            per_round[name].append(median(rounds))
            accuracy[name] = out["final_accuracy"]
            print(f"run {i + 1} {name:12s} process {wall:6.2f} s  round median {median(rounds):6.3f} s  "
                  f"rounds {' '.join(f'{r:.2f}' for r in rounds)}  final accuracy {out['final_accuracy']:.4f}",
                  flush=True)
        if not args.skip_fifty:
            wall, out = run(fifty)
            edges = {k: v for k, v in out["peak_rss_mib"].items() if k.startswith("en")}
            per_en = sum(edges.values()) / 50
            timing = out["round_timings"][0]
            fifty_runs.append((timing["round_s"], per_en, sum(edges.values()), max(edges.values())))
            print(f"run {i + 1} fifty        process {wall:6.2f} s  round {timing['round_s']:.2f} s  "
                  f"{len(edges)} EN processes, peak RSS {' '.join(f'{v:.0f}' for v in edges.values())} MiB "
                  f"-> {per_en:.1f} MiB per EN; SNs {out['peak_rss_mib']['sn0']:.0f}/"
                  f"{out['peak_rss_mib']['sn1']:.0f} MiB",
                  flush=True)

    print(f"\nmedians over {args.repeat} runs (each run: median of rounds 2..{args.rounds}):")
    sim = median(per_round["sim"]) if "sim" in per_round else float("nan")
    for name, values in per_round.items():
        print(f"  {name:12s} round {median(values):6.3f} s   ratio to sim {median(values) / sim:.3f}   "
              f"final accuracy {accuracy[name]:.4f}   runs {' '.join(f'{v:.3f}' for v in values)}")
    if "net-2sn" in per_round and "net-2sn-open" in per_round:
        ratio = median(per_round["net-2sn"]) / median(per_round["net-2sn-open"])
        print(f"  secure vs open round (2 SNs, 4 ENs): {ratio:.3f}x")
    if "net-mariadb" in per_round:
        ratio = median(per_round["net-mariadb"]) / median(per_round["net-sqlite"])
        print(f"  MariaDB vs SQLite network round: {ratio:.3f}x")
    if args.baseline:
        for name in variants:
            if name != "sim":
                ratio = median(per_round[name]) / median(per_round[name + "@base"])
                print(f"  {name}: current / baseline round {ratio:.3f}")
    for name, timings in breakdown.items():
        if name != "sim":
            print(f"  {name} breakdown (median s): " + "  ".join(f"{k} {median(v):.3f}" for k, v in timings.items()))
    if fifty_runs:
        print(f"  50 ENs (10 per process, 2 SNs): round {median(r[0] for r in fifty_runs):.2f} s, "
              f"{median(r[1] for r in fifty_runs):.1f} MiB per EN "
              f"({median(r[2] for r in fifty_runs):.0f} MiB for all 5 EN processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
