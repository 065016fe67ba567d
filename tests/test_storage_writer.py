"""The background writer and the Ledger on top of it: order, flush, retries, no gaps after a failure, checkpoint."""
from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time

import pytest
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from chain.block import Cosignature, SignedBlock
from chain.checkpoint import Checkpoint
from chain.tensors import model_hash
from chain.verify import Head, VerificationError, VerifiedBlock, verify_block
from conftest import build_chain, global_weights, signed_records, trainer_keys, wait_until
from node.ledger import Ledger
from storage.engine import StorageUnavailable
from storage.store import LedgerStore, NotExtendingHead, StoreError
from storage.writer import BackgroundWriter, WriterFailed, is_transient


def final(ledger: Ledger, built: VerifiedBlock) -> VerifiedBlock:
    """A block this node built, co-signed by itself: final under its one-validator set, so ``accept`` takes it."""
    return built.cosigned([Cosignature.create(built.header.height, built.block.hash, ledger.key)])


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


def test_writer_failure_fails_the_jobs_queued_behind_it_then_runs_new_ones(writer):
    done: list[int] = []
    gate = threading.Event()
    writer.submit(gate.wait, 30)                 # hold the writer so the failing job and two behind it queue
    writer.submit(done.append, 1)
    failing = writer.submit(lambda: 1 / 0)
    behind = [writer.submit(done.append, i) for i in (2, 3)]
    gate.set()
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    for future in behind:
        with pytest.raises(WriterFailed, match="^not written: an earlier write failed: division by zero"):
            future.result(timeout=10)
    assert (writer.submit(done.append, 4).result(timeout=10), done) == (None, [1, 4])


def test_writer_flush_never_raises_after_a_failure(writer):
    failing = writer.submit(lambda: 1 / 0)
    writer.flush()
    assert isinstance(failing.exception(timeout=0), ZeroDivisionError)
    writer.flush()


class Flaky:
    """A call that fails with ``error`` for its first ``failures`` tries, then returns the number of tries."""

    def __init__(self, error: BaseException, failures: int):
        self.error, self.failures, self.tries = error, failures, 0

    def __call__(self) -> int:
        self.tries += 1
        if self.tries <= self.failures:
            raise self.error
        return self.tries


def test_writer_retries_a_transient_failure_until_it_succeeds(caplog):
    writer = BackgroundWriter(retry_for=10.0)
    flaky = Flaky(OSError("disk busy"), 3)
    try:
        with caplog.at_level(logging.WARNING, logger="storage.writer"):
            assert writer.submit(flaky).result(timeout=10) == 4    # waits 0.1 + 0.2 + 0.4 s
    finally:
        writer.close()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == \
        [("WARNING", "ledger write failed (disk busy); retrying for up to 10 s")]


def test_writer_gives_up_on_a_transient_failure_after_retry_for(caplog):
    writer = BackgroundWriter(retry_for=0.5)
    flaky = Flaky(OSError("disk gone"), 1000)
    try:
        with caplog.at_level(logging.WARNING, logger="storage.writer"):
            start = time.monotonic()
            with pytest.raises(OSError, match="disk gone"):
                writer.submit(flaky).result(timeout=10)
            elapsed = time.monotonic() - start
        # tries at 0, 0.1, 0.3 s and at the deadline (0.5 s): retried, but not one log line per try
        assert (0.45 < elapsed < 3, 3 <= flaky.tries <= 5) == (True, True)
        assert [r.levelname for r in caplog.records] == ["WARNING", "ERROR"]
        assert writer.submit(lambda: "next").result(timeout=10) == "next"
    finally:
        writer.close()


def test_writer_fails_a_non_transient_error_at_once(writer):
    flaky = Flaky(ValueError("refused"), 1)
    with pytest.raises(ValueError):
        writer.submit(flaky).result(timeout=10)
    assert flaky.tries == 1


def test_writer_without_retry_runs_a_call_once(writer):
    flaky = Flaky(OSError("no"), 1)
    with pytest.raises(OSError):
        writer.submit(flaky, retry=False).result(timeout=10)
    assert flaky.tries == 1


def test_writer_retries_a_write_to_a_locked_sqlite_database_until_the_lock_goes(tmp_path, caplog):
    store = LedgerStore(f"sqlite:///{tmp_path}/ledger.db", statement_timeout=0.1)
    locker = sqlite3.connect(tmp_path / "ledger.db", timeout=1, isolation_level=None)
    writer = BackgroundWriter(retry_for=15.0)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.WARNING, logger="storage.writer"):
            probed = writer.submit(store.probe)
            assert wait_until(lambda: "retrying for up to 15 s" in caplog.text)
            locker.execute("ROLLBACK")
            assert probed.result(timeout=10) is None
        assert [r.levelname for r in caplog.records] == ["WARNING"]
    finally:
        locker.close()
        writer.close()
        store.close()


def test_writer_stays_in_order_across_a_retry(writer):
    done: list[str] = []
    flaky = Flaky(OSError("busy"), 2)
    writer.submit(lambda: done.append("first"))
    writer.submit(lambda: done.append(f"second after {flaky()} tries"))
    writer.submit(lambda: done.append("third"))
    writer.flush()
    assert done == ["first", "second after 3 tries", "third"]


@pytest.mark.parametrize("error, transient", [
    (OperationalError("SELECT 1", {}, Exception("(2003, 'refused')")), True),
    (DBAPIError("SELECT 1", {}, Exception("gone"), connection_invalidated=True), True),
    (PoolTimeout("pool exhausted"), True),
    (StorageUnavailable("cannot reach MySQL"), True),
    (OSError("I/O error"), True),
    (DBAPIError("SELECT 1", {}, Exception("bad"), connection_invalidated=False), False),
    (IntegrityError("INSERT", {}, Exception("duplicate")), False),
    (StoreError("refused"), False),
    (NotExtendingHead("not next"), False),
    (WriterFailed("earlier"), False),
    (ValueError("bug"), False),
])
def test_writer_is_transient_names_what_may_succeed_if_tried_again(error, transient):
    assert is_transient(error) is transient


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
        assert ledger.head == heads[-1] == Head(3, heads[-1].hash, model_hash(global_weights(3, SHAPE)), 3)
    finally:
        ledger.close()


def test_ledger_checkpoint_names_the_durable_head(backend, tmp_path):
    _data_dir, checkpoint, heads = build_chain(backend, 4, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    saved = Checkpoint.read(checkpoint)
    assert (saved.height, saved.hash, saved.valid()) == (3, heads[-1].hash, True)


def test_ledger_verify_chain_passes_on_a_built_chain(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 4, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        report = ledger.verify_chain()
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


def test_ledger_build_encodes_the_weights_and_signs_the_next_block(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        weights = global_weights(2, SHAPE)
        built = ledger.build(round=2, algorithm="fedavg", params={}, weights=weights,
                             records=signed_records(2, heads[-1].model_hash, trainer_keys(3)), metrics={},
                             timestamp_ms=1)
        again = verify_block(built.block, built.records, built.weights_blob, prev=heads[-1],
                             authorities=[ledger.key.public_hex])
        assert (again, built.header.prev_hash, ledger.head) == (built, heads[-1].hash, heads[-1])
    finally:
        ledger.close()


def test_ledger_build_refuses_records_of_another_round(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        with pytest.raises(ValueError, match="record 0"):
            ledger.build(round=2, algorithm="fedavg", params={}, weights=global_weights(2, SHAPE),
                         records=signed_records(3, heads[-1].model_hash, trainer_keys(3)), metrics={},
                         timestamp_ms=1)
    finally:
        ledger.close()


def test_ledger_failed_write_fails_later_blocks_leaves_no_gap_and_rolls_the_head_back(backend, tmp_path, caplog):
    data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    gate = threading.Event()
    try:
        ledger.writer.submit(gate.wait, 30)          # both blocks queue before the first one fails
        weights = global_weights(2, SHAPE)
        records = signed_records(2, heads[-1].model_hash, trainer_keys(3))
        bad = ledger.build(round=2, algorithm="fedavg", params={}, weights=weights, records=records, metrics={},
                           timestamp_ms=1)
        bad_durable = ledger.accept(final(ledger, bad), client_state={"c0": None})   # NULL state: the INSERT fails
        nxt = ledger.build(round=3, algorithm="fedavg", params={}, weights=weights, records=[], metrics={},
                           timestamp_ms=2)
        next_durable = ledger.accept(final(ledger, nxt))
        gate.set()
        with pytest.raises(StoreError):
            bad_durable.result(timeout=30)
        with pytest.raises(WriterFailed):
            next_durable.result(timeout=30)
        assert (ledger.store.head().hash, ledger.head, ledger.durable_head) == (heads[-1].hash, heads[-1], heads[-1])
        assert (ledger.healthy, ledger.health_reason.startswith("ledger write failed: block 2 refused")) == \
            (False, True)
    finally:
        gate.set()
        ledger.close()   # closing after a failed write logs it, and does not fail on top of it
    assert f"closing the ledger after a failed write (durable head {heads[-1].height})" in caplog.text


def test_ledger_writes_again_after_a_failed_write_without_reopening(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    try:
        weights = global_weights(2, SHAPE)
        records = signed_records(2, heads[-1].model_hash, trainer_keys(3))
        built = final(ledger, ledger.build(round=2, algorithm="fedavg", params={}, weights=weights,
                                           records=records, metrics={}, timestamp_ms=1))
        with pytest.raises(StoreError):
            ledger.accept(built, client_state={"c0": None}).result(timeout=30)   # NULL state: refused
        ledger.flush()                                                             # never raises
        assert (ledger.accept(built).result(timeout=30), ledger.store.head(), ledger.healthy) == \
            (built.head, built.head, True)
    finally:
        ledger.close()


def test_ledger_accept_returns_before_the_block_is_durable(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 1, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    gate = threading.Event()
    try:
        ledger.writer.submit(gate.wait, 30)          # hold the writer so the accepted block must queue
        built = ledger.build(round=1, algorithm="fedavg", params={}, weights=global_weights(1, SHAPE), records=[],
                             metrics={}, timestamp_ms=1)
        durable = ledger.accept(final(ledger, built))
        queued = (durable.done(), ledger.store.head().height, ledger.head == built.head)
        gate.set()
        assert (queued, durable.result(timeout=30), ledger.store.head().hash) == \
            ((False, 0, True), built.head, built.block.hash)
    finally:
        gate.set()
        ledger.close()


def test_ledger_load_weights_of_a_queued_block_waits_for_its_write(backend, tmp_path):
    data_dir, _cp, heads = build_chain(backend, 1, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = Ledger.open(data_dir, backend)
    gate = threading.Event()
    try:
        ledger.writer.submit(gate.wait, 30)
        weights = global_weights(1, SHAPE)
        ledger.accept(final(ledger, ledger.build(round=1, algorithm="fedavg", params={}, weights=weights, records=[],
                                                 metrics={}, timestamp_ms=1)))
        threading.Timer(0.2, gate.set).start()
        assert model_hash(ledger.load_weights()) == model_hash(weights)
    finally:
        gate.set()
        ledger.close()


def test_ledger_accepts_blocks_from_another_node_with_the_same_key(backend, tmp_path):
    source_dir, _cp, heads = build_chain(backend, 3, tensor_shape=SHAPE, data_dir=tmp_path / "a", cosigners=1)
    source = Ledger.open(source_dir, backend)
    replica = Ledger.open(tmp_path / "b", f"sqlite:///{tmp_path}/replica.db", key=source.key)
    try:
        for served in source.blocks(0, 2):
            replica.accept(replica.verify(served.block, served.records, served.weights_blob,
                                          served.cosignatures)).result(timeout=30)
        report = replica.verify_chain()
        # one co-signer on each of the 3 blocks, and the proposer on the 2 round blocks
        assert (report.head_hash, report.cosignatures, replica.head) == (heads[-1].hash, 5, heads[-1])
    finally:
        source.close()
        replica.close()


def test_ledger_verify_refuses_a_block_signed_by_another_key_than_the_authority(backend, tmp_path):
    source_dir, _cp, _heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "a")
    source = Ledger.open(source_dir, backend)
    other = Ledger.open(tmp_path / "b", f"sqlite:///{tmp_path}/other.db")
    try:
        (genesis,) = source.blocks(0, 0)
        other.accept(other.verify(genesis.block, genesis.records, genesis.weights_blob)).result(timeout=30)
        with pytest.raises(VerificationError) as caught:
            other.verify(*_next_from(source, other))
        assert (caught.value.height, caught.value.check) == (1, "signature")
    finally:
        source.close()
        other.close()


def _next_from(source: Ledger, other: Ledger):
    """Block 1 of ``source``, re-signed by ``other``'s key on top of the shared genesis."""
    (served,) = source.blocks(1, 1)
    header = dataclasses.replace(served.header, proposer_id=other.key.node_id, proposer_key=other.key.public_hex)
    return SignedBlock.create(header, other.key), served.records, served.weights_blob


def test_ledger_accept_refuses_a_block_not_extending_its_head(backend, tmp_path):
    data_dir, _cp, _heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "a")
    ledger = Ledger.open(data_dir, backend)
    try:
        (genesis,) = ledger.blocks(0, 0)
        with pytest.raises(NotExtendingHead):
            ledger.accept(genesis)
    finally:
        ledger.close()


def test_ledger_verify_refuses_a_block_not_extending_its_head(backend, tmp_path):
    data_dir, _cp, _heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "a")
    ledger = Ledger.open(data_dir, backend)
    try:
        (genesis,) = ledger.blocks(0, 0)
        with pytest.raises(NotExtendingHead):
            ledger.verify(genesis.block, genesis.records, genesis.weights_blob)
    finally:
        ledger.close()
