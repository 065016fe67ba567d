"""Database URLs for the other nodes of a run (beside the given one, on the same server or in the same folder), and
the timeouts that bound every statement."""
from __future__ import annotations

import socket
import sqlite3
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from conftest import mysql_server_url
from storage.engine import (
    CONNECT_TIMEOUT_S,
    SQLITE_BUSY_TIMEOUT_S,
    STATEMENT_TIMEOUT_S,
    StorageUnavailable,
    make_engine,
    sibling_url,
)


@pytest.mark.parametrize("url, expected", [
    ("sqlite:////tmp/run/ledger.db", "sqlite:////tmp/run/ledger_sn1.db"),
    ("sqlite:////tmp/run.v2/ledger", "sqlite:////tmp/run.v2/ledger_sn1"),
    ("sqlite:///rel.db", "sqlite:///rel_sn1.db"),
    ("mysql+pymysql://root:pw@127.0.0.1:3306/fl?charset=utf8mb4", "mysql+pymysql://root:pw@127.0.0.1:3306/fl_sn1?charset=utf8mb4"),
    ("mysql+pymysql://root:@127.0.0.1:3306", "mysql+pymysql://root:@127.0.0.1:3306/fledger_sn1"),
])
def test_a_sibling_database_carries_the_suffix(url: str, expected: str) -> None:
    assert sibling_url(url, "sn1") == expected


def test_a_malformed_url_is_refused_with_the_forms_to_use() -> None:
    with pytest.raises(StorageUnavailable, match="sqlite:///PATH"):
        sibling_url("not a url", "sn1")


# ---- every statement is bounded -----------------------------------------------------------------------------------

def _sqlite_write_waits(url: str, db_file, **timeouts) -> float:
    """Seconds a write through make_engine(url) waits for another connection's exclusive lock before failing."""
    engine = make_engine(url, **timeouts)
    locker = sqlite3.connect(db_file, timeout=1, isolation_level=None)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE t (x INTEGER)"))
        locker.execute("BEGIN EXCLUSIVE")
        start = time.monotonic()
        with pytest.raises(OperationalError, match="database is locked"), engine.begin() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
        return time.monotonic() - start
    finally:
        locker.close()
        engine.dispose()


def test_sqlite_waits_for_a_lock_no_longer_than_the_statement_timeout(tmp_path) -> None:
    assert 0.2 <= _sqlite_write_waits(f"sqlite:///{tmp_path}/a.db", tmp_path / "a.db", statement_timeout=0.3) < 3


def test_sqlite_busy_timeout_set_in_the_url_wins(tmp_path) -> None:
    waited = _sqlite_write_waits(f"sqlite:///{tmp_path}/a.db?timeout=0.2", tmp_path / "a.db", statement_timeout=30)
    assert waited < 3


def test_the_default_timeouts() -> None:
    assert (STATEMENT_TIMEOUT_S, CONNECT_TIMEOUT_S, SQLITE_BUSY_TIMEOUT_S) == (15, 5, 5)


def _mysql_sleep_fails_after(url: str, **timeouts) -> float:
    """Seconds until ``SELECT SLEEP(5)`` through make_engine(url) fails on its statement timeout."""
    engine = make_engine(url, create_database=False, **timeouts)
    try:
        start = time.monotonic()
        with pytest.raises(OperationalError, match="2013"), engine.connect() as conn:
            conn.execute(text("SELECT SLEEP(5)"))
        return time.monotonic() - start
    finally:
        engine.dispose()


@pytest.mark.mysql
def test_mysql_statement_fails_after_the_statement_timeout() -> None:
    server = mysql_server_url()._replace(database=None).render_as_string(hide_password=False)
    assert 0.9 <= _mysql_sleep_fails_after(server, statement_timeout=1) < 10


@pytest.mark.mysql
def test_mysql_timeouts_set_in_the_url_win() -> None:
    server = mysql_server_url()._replace(database=None)
    url = server.update_query_dict({"read_timeout": "1"}).render_as_string(hide_password=False)
    assert _mysql_sleep_fails_after(url, statement_timeout=30) < 10


def test_mysql_connect_to_a_server_that_never_answers_is_bounded() -> None:
    """A server that accepts TCP connections but never answers (a listening socket nobody serves) fails the
    connect within the timeouts instead of hanging."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"mysql+pymysql://root@127.0.0.1:{silent.getsockname()[1]}/x?charset=utf8mb4"
        start = time.monotonic()
        with pytest.raises(StorageUnavailable, match="cannot reach MySQL"):
            make_engine(url, statement_timeout=1, connect_timeout=1)
        assert time.monotonic() - start < 10
