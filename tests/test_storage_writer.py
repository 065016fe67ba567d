"""The background writer and the Ledger on top of it: order, flush, no gaps after a failure, checkpoint."""
from __future__ import annotations

import threading
import time

import pytest

from chain.checkpoint import Checkpoint
from chain.tensors import encode_weights, model_hash
from conftest import build_chain, global_weights, signed_records, trainer_keys
from node.ledger import Ledger
from storage.store import StoreError
from storage.writer import BackgroundWriter, WriterFailed


@pytest.fixture
def writer():
    w = BackgroundWriter(max_pending=4)
    yield w
    w.close()


def test_writer_runs_many_submissions_in_order(writer):
    done: list[int] = []
    futures = [writer.submit(done.append, i) for i in range(500)]
    writer.flush()
    assert (done, [f.done() for f in futures].count(True)) == (list(range(500)), 500)


def test_writer_future_carries_the_return_value(writer):
    assert writer.submit(lambda a, b=0: a + b, 2, b=3).result(timeout=10) == 5


def test_writer_flush_waits_for_a_slow_write(writer):
    done: list[str] = []
    writer.submit(lambda: (time.sleep(0.3), done.append("slow")))
    writer.flush()
    assert done == ["slow"]


def test_writer_failure_fails_every_later_submission(writer):
    done: list[int] = []
    writer.submit(done.append, 1)
    failing = writer.submit(lambda: 1 / 0)
    later = [writer.submit(done.append, i) for i in (2, 3)]
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    for future in later:
        with pytest.raises(WriterFailed):
            future.result(timeout=10)
    assert done == [1]


def test_writer_flush_raises_after_a_failure(writer):
    writer.submit(lambda: 1 / 0)
    with pytest.raises(WriterFailed):
        writer.flush()


def test_writer_submission_after_a_failure_fails_at_once(writer):
    with pytest.raises(ZeroDivisionError):
        writer.submit(lambda: 1 / 0).result(timeout=10)
    assert isinstance(writer.submit(lambda: None).exception(timeout=0), WriterFailed)


def test_writer_runs_submissions_from_many_threads_one_at_a_time(writer):
    active, overlaps, lock = [0], [0], threading.Lock()

    def work():
        with lock:
            active[0] += 1
            overlaps[0] += active[0] > 1
        time.sleep(0.001)
        with lock:
            active[0] -= 1

    threads = [threading.Thread(target=lambda: [writer.submit(work) for _ in range(50)]) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writer.flush()
    assert overlaps[0] == 0


# ---- the Ledger, on both backends --------------------------------------------------------------------------------

SHAPE = (8, 4)


def test_ledger_reopens_at_the_built_head(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 4, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        assert (ledger.tip.header.height, ledger.tip.hash) == (3, heads[-1].hash)
    finally:
        ledger.close()


def test_ledger_checkpoint_names_the_durable_head(backend, tmp_path):
    _data_dir, checkpoint, heads = build_chain(backend, 4, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    saved = Checkpoint.read(checkpoint)
    assert (saved.height, saved.hash, saved.valid()) == (3, heads[-1].hash, True)


def test_ledger_verify_passes_on_a_built_chain(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 4, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        report = ledger.verify()
    finally:
        ledger.close()
    assert (report.head_hash, report.blocks, report.records, report.models_checked) == (heads[-1].hash, 4, 9, 4)


def test_ledger_load_weights_returns_the_head_model(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 3, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        assert model_hash(ledger.load_weights()) == heads[-1].model_hash == model_hash(global_weights(2, SHAPE))
    finally:
        ledger.close()


def test_ledger_refused_block_fails_later_blocks_and_leaves_no_gap(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        weights = global_weights(2, SHAPE)
        records = signed_records(2, heads[-1].model_hash, trainer_keys(3))
        bad, bad_durable = ledger.propose(round=2, algorithm="fedavg", params={}, weights=weights, records=records,
                                          metrics={}, timestamp_ms=1, new_model_hash="ab" * 32)
        _next, next_durable = ledger.propose(round=3, algorithm="fedavg", params={}, weights=weights,
                                             records=[], metrics={}, timestamp_ms=2)
        with pytest.raises(StoreError):
            bad_durable.result(timeout=30)
        with pytest.raises(WriterFailed):
            next_durable.result(timeout=30)
        assert ledger.store.head().hash == heads[-1].hash
    finally:
        with pytest.raises(WriterFailed):
            ledger.close()


def test_ledger_propose_returns_before_the_block_is_durable(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 1, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    gate = threading.Event()
    try:
        ledger.writer.submit(gate.wait, 30)          # hold the writer so the proposed block must queue
        block, durable = ledger.propose(round=1, algorithm="fedavg", params={}, weights=global_weights(1, SHAPE),
                                        records=[], metrics={}, timestamp_ms=1)
        queued = (durable.done(), ledger.store.head().height, ledger.tip.hash == block.hash)
        gate.set()
        durable.result(timeout=30)
        assert (queued, ledger.store.head().hash) == ((False, 0, True), block.hash)
    finally:
        gate.set()
        ledger.close()


def test_ledger_accepts_a_block_proposed_by_another_node_with_the_same_key(backend, tmp_path):
    source_dir, _cp, heads = build_chain(backend, 3, tensor_shape=SHAPE, data_dir=tmp_path / "a")
    source = Ledger.open(source_dir, backend)
    replica = Ledger.open(tmp_path / "b", f"sqlite:///{tmp_path}/replica.db", key=source.key)
    try:
        for height in range(3):
            block, records = source.get_block(height)
            replica.accept(block, records, source.store.load_weights_blob(height)).result(timeout=30)
        assert replica.verify().head_hash == heads[-1].hash
    finally:
        source.close()
        replica.close()


def test_ledger_accept_refuses_a_block_not_extending_its_tip(backend, tmp_path):
    data_dir, _cp, _heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "a")
    ledger = Ledger.open(data_dir, backend)
    try:
        genesis, _ = ledger.get_block(0)
        with pytest.raises(StoreError):
            ledger.accept(genesis, [], encode_weights(global_weights(0, SHAPE)))
    finally:
        ledger.close()
