"""Benchmark: append a block carrying the 6.6 MB MNIST CNN (1,663,370 float32) and 10 signed records.

    python bench/bench_append.py [--db URL] [--repeat 5]

Runs on a SQLite file and on MariaDB/MySQL (--db, else FLEDGER_TEST_MYSQL_URL with database fledger_bench,
else the local server). Prints per-run times and medians for: verify_block (what a peer does with a received
block); LedgerStore.append alone (it does not verify again); how long Ledger.build plus Ledger.accept block their
caller; and how long until the accepted block is durable.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain.block import Cosignature, SignedBlock, SignedRecord, UpdateRecord, build_header  # noqa: E402
from chain.keys import NodeKey  # noqa: E402
from chain.tensors import encode_weights, model_hash  # noqa: E402
from chain.verify import verify_block  # noqa: E402
from node.ledger import Ledger  # noqa: E402
from storage.store import LedgerStore  # noqa: E402

MNIST_CNN = {"conv1.weight": (32, 1, 5, 5), "conv1.bias": (32,), "conv2.weight": (64, 32, 5, 5),
             "conv2.bias": (64,), "fc1.weight": (512, 3136), "fc1.bias": (512,), "fc2.weight": (10, 512),
             "fc2.bias": (10,)}
PROPOSER = NodeKey.from_seed(b"bench-proposer")
TRAINERS = [NodeKey.from_seed(f"bench-trainer-{i}".encode()) for i in range(10)]


def cnn_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in MNIST_CNN.items()}


def records_for(round_: int, base: str) -> list[SignedRecord]:
    return [SignedRecord.create(UpdateRecord(round=round_, trainer_id=k.node_id, trainer_key=k.public_hex,
                                             base_model_hash=base, update_hash=base, samples=600,
                                             metrics={"loss_micro": 1000 + i}), k)
            for i, k in enumerate(TRAINERS)]


def median_line(label: str, times: list[float]) -> str:
    runs = ", ".join(f"{t * 1000:.1f}" for t in times)
    return f"  {label}: runs [{runs}] ms; median {statistics.median(times) * 1000:.1f} ms"


def bench_store(url: str, repeat: int) -> tuple[list[float], list[float]]:
    store = LedgerStore(url)
    store.reset()
    try:
        weights = cnn_weights(0)
        prev = build_header(prev=None, prev_hash=None, timestamp_ms=0, round=0, algorithm="fedavg", params={},
                            model_hash=model_hash(weights), records=[], metrics={}, proposer=PROPOSER)
        genesis = SignedBlock.create(prev, PROPOSER)
        store.append(verify_block(genesis, [], encode_weights(weights), prev=None))
        prev_hash, verify_times, times = genesis.hash, [], []
        for round_ in range(1, repeat + 1):
            weights = cnn_weights(round_)
            records = records_for(round_, prev.model_hash)
            header = build_header(prev=prev, prev_hash=prev_hash, timestamp_ms=round_, round=round_,
                                  algorithm="fedavg", params={}, model_hash=model_hash(weights), records=records,
                                  metrics={}, proposer=PROPOSER)
            block, blob = SignedBlock.create(header, PROPOSER), encode_weights(weights)
            t0 = time.perf_counter()
            cosigs = [Cosignature.create(round_, block.hash, PROPOSER)]   # the only validator: final
            verified = verify_block(block, records, blob, cosigs, prev=store.head(),
                                    authorities=[PROPOSER.public_hex])
            t1 = time.perf_counter()
            store.append(verified)
            verify_times.append(t1 - t0)
            times.append(time.perf_counter() - t1)
            prev, prev_hash = header, block.hash
        return verify_times, times
    finally:
        store.close()


def bench_ledger(url: str, repeat: int, data_dir: Path) -> tuple[list[float], list[float]]:
    reset = LedgerStore(url)
    reset.reset()
    reset.close()
    ledger = Ledger.open(data_dir, url, key=PROPOSER)
    try:
        genesis = ledger.build(round=0, algorithm="fedavg", params={}, weights=cnn_weights(0), records=[],
                               metrics={}, timestamp_ms=0)
        ledger.accept(genesis).result()
        blocked, until_durable = [], []
        for round_ in range(1, repeat + 1):
            weights = cnn_weights(round_)
            records = records_for(round_, ledger.head.model_hash)
            t0 = time.perf_counter()
            built = ledger.build(round=round_, algorithm="fedavg", params={}, weights=weights, records=records,
                                 metrics={}, timestamp_ms=round_)
            built = built.cosigned([Cosignature.create(built.header.height, built.block.hash, ledger.key)])
            durable = ledger.accept(built)
            blocked.append(time.perf_counter() - t0)
            durable.result()
            until_durable.append(time.perf_counter() - t0)
        return blocked, until_durable
    finally:
        ledger.close()


def mysql_url(arg: str | None) -> str:
    if arg:
        return arg
    base = os.environ.get("FLEDGER_TEST_MYSQL_URL", "mysql+pymysql://root:@127.0.0.1:3306/x?charset=utf8mb4")
    return make_url(base).set(database="fledger_bench").render_as_string(hide_password=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", help="MySQL/MariaDB URL (default: FLEDGER_TEST_MYSQL_URL's server, db fledger_bench)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    params = sum(int(np.prod(s)) for s in MNIST_CNN.values())
    print(f"MNIST CNN: {params:,} float32 parameters, {len(encode_weights(cnn_weights(0))) / 1e6:.2f} MB blob, "
          f"10 signed records per block")
    with tempfile.TemporaryDirectory(prefix="fledger-bench-append-") as tmp:
        targets = [("sqlite", f"sqlite:///{tmp}/ledger.db"), ("mysql", mysql_url(args.db))]
        for name, url in targets:
            print(f"{name}: {make_url(url).render_as_string(hide_password=True)}")
            verify_times, append_times = bench_store(url, args.repeat)
            print(median_line("verify_block", verify_times))
            print(median_line("store.append alone", append_times))
            blocked, durable = bench_ledger(url, args.repeat, Path(tmp) / f"node-{name}")
            print(median_line("Ledger.build + accept block the caller", blocked))
            print(median_line("Ledger.build + accept until durable", durable))


if __name__ == "__main__":
    main()
