"""The scenario's bandwidth model against the kernel at several rates: per rate, an entry super node and one edge node
in two network namespaces whose veth link tc tbf limits to the rate each way, both `--no-link-shaping` under a
scenario whose link says that rate (the set-up of tests/test_netns_bandwidth.py, in tests/netns.py).

Per rate it prints every round's measured time less the proposer's global evaluation (``round_s - evaluate_s``; the
time model does not count it) beside the virtual clock's ``sim_round_s``, then a table of medians over all rounds,
round 1 included (its cold start shows there if the device's padded training does not cover it). The "link" columns
take the edge's padded training out of both sides: what the links took, measured, against the model's two
transfers. "goodput" is plain TCP over the same link before the nodes start: payload at the rate less the
Ethernet, IP and TCP headers tbf also counts (1448 of every 1514 bytes on the wire). Needs root (`ip netns`). Usage:

    python bench/bench_tbf.py [--rates 8,16,32] [--rounds 3] [--gflops 2]
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from netns import (  # noqa: E402
    DEVICE_GFLOPS,
    NetnsUnavailable,
    model_facts,
    probe_namespaces,
    raw_goodput_mbit,
    shaped_link,
    train_over_link,
    write_scenario,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="8,16,32", help="link rates in Mbit/s, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gflops", type=float, default=DEVICE_GFLOPS,
                        help="the edge device's GFLOP/s in the scenario (its training is padded to that)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    try:
        probe_namespaces()
    except NetnsUnavailable as exc:
        sys.exit(f"cannot create network namespaces here (run as root on Linux): {exc}")
    print("command: python " + " ".join(shlex.quote(a) for a in ["bench/bench_tbf.py", *sys.argv[1:]]), flush=True)
    model_bytes, compute_s = model_facts(args.gflops)
    print(f"model {model_bytes} B; edge share 0 trains {compute_s:.3f} s on a {args.gflops:g} GFLOP/s device "
          f"(padded); tbf burst 32kbit latency 400ms on both veth ends", flush=True)
    work = Path(tempfile.mkdtemp(prefix="fledger-tbf-"))
    table = []
    for i, rate in enumerate(rates):
        started = time.perf_counter()
        root = work / f"rate{i}"
        root.mkdir()
        scenario = write_scenario(root / "scenario.toml", rate, gflops=args.gflops)
        with shaped_link(rate, tag=str(i)) as link:
            goodput = raw_goodput_mbit(link, 2_000_000)
            rounds = train_over_link(link, root, scenario, args.rounds)
        if len(rounds) != args.rounds:
            sys.exit(f"{rate:g} Mbit/s: {len(rounds)} of {args.rounds} rounds finished; logs in {root}")
        measured = [r["round_s"] - r["evaluate_s"] for r in rounds]
        sim = [r["sim_round_s"] for r in rounds]
        print(f"{rate:6g} Mbit/s  run {time.perf_counter() - started:5.1f} s  rounds (measured/sim s) "
              + "  ".join(f"{m:.2f}/{s:.2f}" for m, s in zip(measured, sim, strict=True))
              + "  evaluate_s " + " ".join(f"{r['evaluate_s']:.2f}" for r in rounds), flush=True)
        m, s = statistics.median(measured), statistics.median(sim)
        table.append((rate, goodput, m, s, m - compute_s, s - compute_s))

    print(f"\nmedians over all {args.rounds} rounds (round 1 included):")
    print(f"{'rate':>6} {'goodput':>8} {'measured':>9} {'sim':>8} {'ratio':>6} {'link':>7} {'model':>7} {'ratio':>6}")
    print(f"{'Mbit/s':>6} {'Mbit/s':>8} {'s':>9} {'s':>8} {'':>6} {'s':>7} {'s':>7} {'':>6}")
    for rate, goodput, m, s, link_m, link_s in table:
        print(f"{rate:6g} {goodput:8.2f} {m:9.3f} {s:8.3f} {m / s:6.3f} {link_m:7.3f} {link_s:7.3f} "
              f"{link_m / link_s:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
