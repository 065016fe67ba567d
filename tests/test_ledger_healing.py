"""A ledger whose store fails for a while heals without reopening: a write that fails for good rolls the head back
to the durable head and makes the ledger unhealthy; ``heal`` probes the store and makes it healthy again; the next
block is written. On real databases: a SQLite file locked by another connection, a checkpoint file that cannot be
written, a private MariaDB server killed, restarted and frozen, a MySQL table renamed away."""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError

from chain.block import Cosignature
from chain.checkpoint import Checkpoint
from chain.keys import NodeKey
from chain.verify import Head, VerifiedBlock
from conftest import build_chain, fresh_database, global_weights, raw_connection, wait_until
from node.ledger import KEY_FILE, Ledger
from privatedb import PrivateMariaDB, private_mariadb  # noqa: F401
from storage.store import LedgerStore

SHAPE = (8, 4)


def open_ledger(url: str, data_dir: Path, *, retry_for: float, statement_timeout: float | None = None,
                connect_timeout: float | None = None) -> Ledger:
    store = LedgerStore(url, statement_timeout=statement_timeout, connect_timeout=connect_timeout)
    return Ledger(store, NodeKey.load_or_create(data_dir / KEY_FILE), data_dir / "checkpoint.json",
                  retry_for=retry_for)


def next_block(ledger: Ledger) -> VerifiedBlock:
    """The block after the ledger's head, co-signed by the node itself (final under its one-validator set)."""
    round_ = ledger.head.round + 1
    built = ledger.build(round=round_, algorithm="fedavg", params={}, weights=global_weights(round_, SHAPE),
                         records=[], metrics={}, timestamp_ms=round_)
    return built.cosigned([Cosignature.create(built.header.height, built.block.hash, ledger.key)])


def assert_rolled_back_and_unhealthy(ledger: Ledger, durable: Head, reason_starts: str) -> None:
    assert (ledger.head, ledger.durable_head, ledger.healthy) == (durable, durable, False)
    assert ledger.health_reason.startswith(reason_starts), ledger.health_reason
    assert "\n" not in ledger.health_reason and "INSERT" not in ledger.health_reason
    assert len(ledger.health_reason) <= 300


def assert_writes_again(ledger: Ledger, blocks: int) -> None:
    """The next block is accepted and durable, and the whole chain verifies."""
    block = next_block(ledger)
    assert ledger.accept(block).result(timeout=30) == block.head
    assert (ledger.store.head(), ledger.durable_head, ledger.healthy) == (block.head, block.head, True)
    report = ledger.verify_chain()
    assert (report.blocks, report.head_hash) == (blocks, block.head.hash)


def writer_logs(caplog) -> list[str]:
    return [r.levelname for r in caplog.records if r.name == "storage.writer"]


# ---- SQLite ----------------------------------------------------------------------------------------------------------

def test_a_sqlite_lock_fails_the_write_and_heal_recovers_without_reopening(tmp_path, caplog):
    url = f"sqlite:///{tmp_path}/ledger.db"
    data_dir, _cp, heads = build_chain(url, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = open_ledger(url, data_dir, retry_for=1.0, statement_timeout=0.2)
    locker = sqlite3.connect(tmp_path / "ledger.db", timeout=1, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with caplog.at_level(logging.INFO):
            with pytest.raises(OperationalError, match="database is locked"):
                ledger.accept(next_block(ledger)).result(timeout=30)
        assert writer_logs(caplog) == ["WARNING", "ERROR"]     # one line when retrying starts, one when it ends
        assert_rolled_back_and_unhealthy(ledger, heads[-1], "ledger store unavailable: database is locked")
        assert ledger.heal() is False
        assert ledger.health_reason == "ledger store unavailable: database is locked"
        locker.execute("ROLLBACK")
        assert ledger.heal() is True
        assert (ledger.healthy, ledger.health_reason, ledger.head) == (True, "", heads[-1])
        assert_writes_again(ledger, 3)
    finally:
        locker.close()
        ledger.close()


def test_a_checkpoint_that_cannot_be_written_leaves_the_block_durable(backend, tmp_path):
    data_dir, checkpoint, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = open_ledger(backend, data_dir, retry_for=1.0)
    try:
        checkpoint.unlink()
        checkpoint.mkdir()          # the atomic rename onto it fails: IsADirectoryError
        block = next_block(ledger)
        assert ledger.accept(block).result(timeout=30) == block.head
        assert (ledger.head, ledger.durable_head, ledger.store.head()) == (block.head, block.head, block.head)
        assert (ledger.healthy, ledger.health_reason.startswith("cannot write the checkpoint: ")) == (False, True)
        assert ledger.heal() is False
        assert ledger.health_reason.startswith("cannot write the checkpoint: ")
        checkpoint.rmdir()
        assert ledger.heal() is True
        saved = Checkpoint.read(checkpoint)
        assert (saved.height, saved.hash, saved.valid(), ledger.healthy) == (2, block.head.hash, True, True)
        assert_writes_again(ledger, 4)
    finally:
        ledger.close()


def test_heal_follows_a_store_head_moved_ahead_by_a_commit_whose_answer_was_lost(backend, tmp_path):
    """A write whose COMMIT lost its answer may have committed: the store is then ahead of the durable head.
    Here another connection writes that block, as the lost commit would have."""
    data_dir, checkpoint, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = open_ledger(backend, data_dir, retry_for=1.0)
    other = LedgerStore(backend)
    try:
        block = next_block(ledger)
        other.append(block)
        assert (ledger.head, ledger.durable_head) == (heads[-1], heads[-1])
        assert ledger.heal() is True
        assert (ledger.head, ledger.durable_head, ledger.validators) == \
            (block.head, block.head, frozenset({ledger.key.public_hex}))
        assert Checkpoint.read(checkpoint).height == 2
        assert_writes_again(ledger, 4)
    finally:
        other.close()
        ledger.close()


def test_heal_refuses_a_store_that_lost_the_durable_head(backend, tmp_path):
    data_dir, checkpoint, heads = build_chain(backend, 3, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = open_ledger(backend, data_dir, retry_for=1.0)
    try:
        with raw_connection(backend) as conn:
            for table in ("cosignatures", "model_chunks", "update_records", "blocks"):
                conn.execute(text(f"DELETE FROM {table} WHERE height = 2"))
        assert ledger.heal() is False
        assert "does not hold this node's durable head 2" in ledger.health_reason
        assert (ledger.head, ledger.durable_head, Checkpoint.read(checkpoint).height) == (heads[-1], heads[-1], 2)
    finally:
        ledger.close()


def test_a_block_written_by_an_earlier_try_counts_as_written(backend, tmp_path):
    """A retried write finds its block already stored (the first try committed, but its answer was lost)."""
    data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    ledger = open_ledger(backend, data_dir, retry_for=1.0)
    other = LedgerStore(backend)
    gate = threading.Event()
    try:
        ledger.writer.submit(gate.wait, 30)
        block = next_block(ledger)
        durable = ledger.accept(block)
        other.append(block)
        gate.set()
        assert (durable.result(timeout=30), ledger.durable_head, ledger.healthy) == (block.head, block.head, True)
    finally:
        gate.set()
        other.close()
        ledger.close()


# ---- probe --------------------------------------------------------------------------------------------------------

def test_probe_passes_on_a_working_store_and_writes_nothing(backend, tmp_path):
    _data_dir, _cp, heads = build_chain(backend, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    store = LedgerStore(backend)
    try:
        store.probe()
        assert (store.head(), store.count()) == (heads[-1], 2)
    finally:
        store.close()


def test_probe_raises_while_another_connection_holds_an_exclusive_sqlite_lock(tmp_path):
    store = LedgerStore(f"sqlite:///{tmp_path}/ledger.db", statement_timeout=0.2)
    locker = sqlite3.connect(tmp_path / "ledger.db", timeout=1, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(OperationalError, match="database is locked"):
            store.probe()
        locker.execute("ROLLBACK")
        store.probe()
    finally:
        locker.close()
        store.close()


@pytest.mark.mysql
@pytest.mark.parametrize("table", ["blocks", "update_records", "model_chunks", "cosignatures", "client_state"])
def test_probe_raises_when_a_mysql_table_was_renamed_away(table, tmp_path):
    with fresh_database("mysql", tmp_path) as url:
        store = LedgerStore(url)
        try:
            store.probe()
            with raw_connection(url) as conn:
                conn.execute(text(f"RENAME TABLE `{table}` TO `{table}_away`"))
            with pytest.raises(DBAPIError, match="1146"):   # ProgrammingError: table doesn't exist
                store.probe()
            with raw_connection(url) as conn:
                conn.execute(text(f"RENAME TABLE `{table}_away` TO `{table}`"))
            store.probe()
        finally:
            store.close()


# ---- a private MariaDB server, killed, restarted and frozen ---------------------------------------------------------

@pytest.fixture
def server(private_mariadb: PrivateMariaDB) -> PrivateMariaDB:  # noqa: F811
    private_mariadb.ensure_up()
    return private_mariadb


def private_chain(server: PrivateMariaDB, tmp_path: Path) -> tuple[str, Path, list[Head]]:
    url = server.url(f"fledger_heal_{uuid.uuid4().hex[:8]}")
    data_dir, _cp, heads = build_chain(url, 2, tensor_shape=SHAPE, data_dir=tmp_path / "node")
    return url, data_dir, heads


@pytest.mark.mysql
def test_a_killed_server_fails_the_write_and_heal_recovers_after_its_restart(server, tmp_path):
    url, data_dir, heads = private_chain(server, tmp_path)
    ledger = open_ledger(url, data_dir, retry_for=2.0, statement_timeout=3, connect_timeout=2)
    try:
        server.kill()
        start = time.monotonic()
        with pytest.raises(OperationalError, match="2003"):      # connection refused, after 2 s of retries
            ledger.accept(next_block(ledger)).result(timeout=30)
        assert time.monotonic() - start < 20
        assert_rolled_back_and_unhealthy(ledger, heads[-1], "ledger store unavailable: (2003, ")
        with pytest.raises(OperationalError):
            ledger.store.probe()
        assert ledger.heal() is False
        with pytest.raises(OperationalError):                    # reading a store that is down is a real failure
            ledger.verify_chain()
        server.restart()
        assert ledger.heal() is True
        assert_writes_again(ledger, 3)
    finally:
        ledger.close()


@pytest.mark.mysql
def test_a_server_restarted_within_retry_for_just_delays_the_write(server, tmp_path, caplog):
    url, data_dir, heads = private_chain(server, tmp_path)
    ledger = open_ledger(url, data_dir, retry_for=30.0, statement_timeout=3, connect_timeout=2)
    try:
        server.kill()
        with caplog.at_level(logging.WARNING):
            block = next_block(ledger)
            durable = ledger.accept(block)
            assert wait_until(lambda: "retrying for up to 30 s" in caplog.text)
            server.restart()
            assert durable.result(timeout=40) == block.head
        assert writer_logs(caplog) == ["WARNING"]
        assert (ledger.durable_head, ledger.store.head(), ledger.healthy) == (block.head, block.head, True)
        assert_writes_again(ledger, 4)
    finally:
        ledger.close()


@pytest.mark.mysql
def test_a_frozen_server_fails_statements_within_the_statement_timeout(server, tmp_path):
    url, data_dir, heads = private_chain(server, tmp_path)
    ledger = open_ledger(url, data_dir, retry_for=1.0, statement_timeout=2, connect_timeout=2)
    try:
        assert ledger.store.head() == heads[-1]      # a pooled connection, open when the server freezes
        server.freeze()
        start = time.monotonic()
        with pytest.raises(OperationalError):
            ledger.store.head()
        assert time.monotonic() - start < 20           # a bound, not a benchmark: about 2 to 6 s
        start = time.monotonic()
        with pytest.raises(OperationalError):
            ledger.accept(next_block(ledger)).result(timeout=30)
        assert time.monotonic() - start < 20
        assert_rolled_back_and_unhealthy(ledger, heads[-1], "ledger store unavailable: ")
        assert ledger.heal() is False
        server.thaw()
        assert ledger.heal() is True
        assert_writes_again(ledger, 3)
    finally:
        server.thaw()
        ledger.close()

