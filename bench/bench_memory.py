"""Peak resident memory of `main.py simulate` with 10 and 100 clients (FedAvg and FedPer, the MNIST CNN).

Each run is a separate process; its peak RSS is read from the kernel (ru_maxrss of the finished child). Usage:

    python bench/bench_memory.py [--rounds 1] [--clients 10 100]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def peak_rss_mib(cmd: list[str]) -> float:
    pid = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).pid
    _, status, usage = os.wait4(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}")
    return usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fledger-mem-"))
    for algo in ("fedavg", "fedper"):
        for clients in args.clients:
            cmd = [sys.executable, "main.py", "simulate", "--algo", algo, "--clients", str(clients),
                   "--rounds", str(args.rounds), "--fresh", "--no-progress", "--threads", "2",
                   "--data-root", str(work / f"{algo}-{clients}")]
            print(f"{algo:6s} {clients:4d} clients: peak RSS {peak_rss_mib(cmd):7.1f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
