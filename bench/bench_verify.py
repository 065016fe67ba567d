"""Benchmark: time verify_chain over a 1,000-block chain of 10 signed records each (headers pass, then models).

    python bench/bench_verify.py [--blocks 1000] [--records 10] [--db URL] [--repeat 5]

The chain is built once through verify_block and LedgerStore.append and cached (by default in a SQLite file in the
temp directory); a later run with the same --blocks/--records reuses it.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chain.block import Cosignature, SignedBlock, SignedRecord, UpdateRecord, build_header  # noqa: E402
from chain.keys import NodeKey  # noqa: E402
from chain.tensors import encode_weights, model_hash  # noqa: E402
from chain.verify import check_model, verify_block, verify_chain  # noqa: E402
from storage.store import LedgerStore  # noqa: E402


def build(store: LedgerStore, blocks: int, records_per_block: int) -> None:
    """Append blocks until the store holds ``blocks`` of them (resuming a partly built chain)."""
    proposer = NodeKey.from_seed(b"bench-proposer")
    trainers = [NodeKey.from_seed(f"bench-trainer-{i}".encode()) for i in range(records_per_block)]
    head = store.head()
    prev, prev_hash = (None, None)
    if head is not None:
        block, _ = store.get_block(head.height)
        prev, prev_hash = block.header, block.hash
    start = 0 if head is None else head.height + 1
    t0 = time.perf_counter()
    for height in range(start, blocks):
        weights = {"w": np.full((8, 4), height, dtype=np.float32), "b": np.arange(4, dtype=np.float32)}
        digest = model_hash(weights)
        base = prev.model_hash if prev else digest
        records = [] if prev is None else [
            SignedRecord.create(UpdateRecord(round=height, trainer_id=k.node_id, trainer_key=k.public_hex,
                                             base_model_hash=base, update_hash=digest, samples=100 + i,
                                             metrics={"loss_micro": 1000 + i}), k)
            for i, k in enumerate(trainers)]
        header = build_header(prev=prev, prev_hash=prev_hash, timestamp_ms=1_700_000_000_000 + height, round=height,
                              algorithm="fedavg", params={"lr": "0.05"}, model_hash=digest, records=records,
                              metrics={"accuracy_bp": 9000}, proposer=proposer)
        block = SignedBlock.create(header, proposer)
        # the proposer is the only validator: its co-signature makes each round block final
        cosigs = [Cosignature.create(height, block.hash, proposer)] if height else []
        store.append(verify_block(block, records, encode_weights(weights), cosigs, prev=store.head(),
                                  authorities=[proposer.public_hex]))
        prev, prev_hash = header, block.hash
    if start < blocks:
        print(f"built blocks {start}..{blocks - 1} in {time.perf_counter() - t0:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=1000)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--db", help="ledger URL (default: a cached SQLite file in the temp directory)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    cached = Path(tempfile.gettempdir()) / f"fledger-bench-verify-{args.blocks}x{args.records}.db"
    url = args.db or f"sqlite:///{cached}"
    store = LedgerStore(url)
    try:
        build(store, args.blocks, args.records)
        print(f"chain: {store.count()} blocks x {args.records} records at {url}")
        times = []
        for run in range(args.repeat):
            t0 = time.perf_counter()
            report = verify_chain(store, check_models=False)
            times.append(time.perf_counter() - t0)
            print(f"  run {run + 1}: headers, links, signatures, Merkle roots: {times[-1]:.3f} s "
                  f"({report.blocks} blocks, {report.records} records)")
        print(f"verify_chain(check_models=False): median {statistics.median(times):.3f} s "
              f"for {report.blocks} blocks (target < 2 s for 1,000)")
        t0 = time.perf_counter()
        for stored in store.iter_blocks():
            check_model(stored)
        model_pass = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify_chain(store, check_models=True)
        print(f"model pass alone (read + re-hash every block's weights): {model_pass:.3f} s; "
              f"full verify_chain(check_models=True): {time.perf_counter() - t0:.3f} s")
    finally:
        store.close()


if __name__ == "__main__":
    main()
