"""Recovery benchmarks on a network of real processes (3 super nodes, 4 edge nodes in 2 hosts, loopback):

- ``takeover``: kill -9 of the proposer (the entry) mid-training; the time from the kill to the next final block,
  which another validator proposes (goal: at most two round deadlines);
- ``frozen``: SIGSTOP of a non-entry super node for longer than a round deadline; the longest wait for a block
  while it is frozen, against the median round of the same run before the freeze;
- ``db-outage``: a private MariaDB under every super node (2 super nodes) killed for 30 s and restarted; the wait
  for the first block after the outage began, against the median round before it.

Every node runs with ``--round-timeout`` (12 s, tests/faultnet.py). Each scenario runs ``--repeat`` times on a fresh
network; medians are printed, with every run's figures. It reuses the fault tests' harness (tests/faultnet.py and
tests/privatedb.py). Usage:

    python bench/bench_faults.py [--repeat 5] [--only takeover,frozen,db-outage]
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from faultnet import ROUND_TIMEOUT, FaultNet  # noqa: E402
from privatedb import PrivateMariaDB  # noqa: E402

OUTAGE_S = 30.0


def warm_up(net: FaultNet, first: int, rounds: int = 5) -> float:
    """Start a long training run, wait for height ``first``, and return the median round of the next ``rounds``
    (the time between consecutive new heights), the baseline of the same run."""
    net.train(200)
    net.wait_height(first, 120)
    since = time.monotonic()
    net.wait_height(net.height() + rounds, 60)
    return rounds_s(net, since, time.monotonic())


def rounds_s(net: FaultNet, since: float, until: float) -> float:
    """The median time between consecutive new heights in [since, until]."""
    times = [at for at, _ in net.heights if since <= at <= until]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return statistics.median(gaps) if gaps else float("nan")


def next_block(net: FaultNet, height: int, after: float, timeout: float, what: str) -> float:
    """When the first block above ``height`` appeared more than half a second after ``after`` (one already on its
    way when the fault began does not count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        later = [at for at, h in net.heights if h > height and at > after + 0.5]
        if later:
            return later[0]
        time.sleep(0.2)
    raise RuntimeError(f"no block after {what}")


def takeover(root: Path) -> dict[str, float]:
    net = FaultNet(root, supernodes=3)
    try:
        clean = warm_up(net, 6)
        before, killed = net.height(), time.monotonic()
        net.signal("sn0", signal.SIGKILL)
        at = next_block(net, before, killed, 4 * ROUND_TIMEOUT + 60, "the proposer was killed")
        return {"kill_to_next_block_s": at - killed, "clean_round_s": clean}
    finally:
        net.close()


def frozen(root: Path) -> dict[str, float]:
    net = FaultNet(root, supernodes=3)
    try:
        clean = warm_up(net, 6)
        stopped = time.monotonic()
        net.signal("sn2", signal.SIGSTOP)
        time.sleep(ROUND_TIMEOUT + 8)
        stall = net.longest_stall(stopped, time.monotonic())
        resumed = time.monotonic()
        time.sleep(10)   # rounds while it stays frozen (it was dropped from the round after missing heartbeats)
        during = rounds_s(net, resumed, time.monotonic())
        net.signal("sn2", signal.SIGCONT)
        return {"clean_round_s": clean, "stall_s": stall, "round_while_frozen_s": during}
    finally:
        net.close()


def db_outage(root: Path, db: PrivateMariaDB) -> dict[str, float]:
    prefix = f"bench_faults_{int(time.time() * 1000) % 10**9}"
    net = FaultNet(root, supernodes=2, db=lambda name: db.url(f"{prefix}_{name}"))
    try:
        clean = warm_up(net, 5)
        height, down = net.height(), time.monotonic()
        db.kill()
        time.sleep(OUTAGE_S)
        db.restart()
        at = next_block(net, height, down, 6 * ROUND_TIMEOUT + 120, "the database came back")
        return {"clean_round_s": clean, "outage_s": OUTAGE_S, "first_block_after_outage_start_s": at - down}
    finally:
        net.close()
        db.ensure_up()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="takeover,frozen,db-outage")
    args = parser.parse_args()
    wanted = args.only.split(",")
    results: dict[str, list[dict[str, float]]] = {}
    db = PrivateMariaDB() if "db-outage" in wanted else None
    if db is not None:
        if db.missing:
            sys.exit(f"db-outage needs mariadbd and mariadb-install-db: {db.missing}")
        db.start()
    try:
        for i in range(args.repeat):
            for name in wanted:
                with tempfile.TemporaryDirectory(prefix=f"bench-faults-{name}-") as tmp:
                    if name == "takeover":
                        row = takeover(Path(tmp))
                    elif name == "frozen":
                        row = frozen(Path(tmp))
                    elif name == "db-outage":
                        assert db is not None
                        row = db_outage(Path(tmp), db)
                    else:
                        sys.exit(f"unknown scenario {name}")
                results.setdefault(name, []).append(row)
                print(f"run {i + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    finally:
        if db is not None:
            db.stop()
    print(f"\nround deadline (--round-timeout): {ROUND_TIMEOUT:.0f} s; medians of {args.repeat} runs")
    for name, rows in results.items():
        keys = rows[0].keys()
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        print(f"{name:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()))
        if "clean_round_s" in med:
            worst = max(v for k, v in med.items() if k not in ("clean_round_s", "outage_s"))
            print(f"{'':10s} longest wait / clean round = {worst / med['clean_round_s']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
