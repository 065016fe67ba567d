"""One engine factory for SQLite and MySQL/MariaDB URLs; backend differences live here."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from chain.private import PRIVATE_FILE, create_private, tighten

log = logging.getLogger(__name__)


# Bounds on every SQL statement, so a database that hangs (a frozen server, a lost network) fails the write
# instead of stalling the node; the background writer then retries it (storage.writer).
STATEMENT_TIMEOUT_S = 15     # MySQL: the longest one read or write on the connection's socket may wait
CONNECT_TIMEOUT_S = 5        # MySQL: the longest opening a connection may take
SQLITE_BUSY_TIMEOUT_S = 5    # SQLite: the longest a statement waits for another connection's lock


class StorageUnavailable(RuntimeError):
    """The database URL is malformed or the server cannot be reached."""


def sibling_url(url: str, suffix: str) -> str:
    """Another database beside ``url``, for another node of the same run: on MySQL the database name with
    ``_SUFFIX`` appended, on SQLite the file name with ``_SUFFIX`` before its extension."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StorageUnavailable(f"bad database URL {url!r}: use sqlite:///PATH or "
                                 "mysql+pymysql://user:pw@host:3306/db?charset=utf8mb4") from exc
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        path = PurePath(parsed.database)
        return parsed.set(database=str(path.with_name(f"{path.stem}_{suffix}{path.suffix}"))) \
            .render_as_string(hide_password=False)
    return parsed.set(database=f"{parsed.database or 'fledger'}_{suffix}").render_as_string(hide_password=False)


def make_engine(url: str, *, create_database: bool = True, statement_timeout: float | None = None,
                connect_timeout: float | None = None) -> Engine:
    """Build the engine for ``url``; for MySQL, create the database when it is missing.

    Every statement is bounded, so a hung or frozen database fails a write instead of stalling the node:
    ``statement_timeout`` (default STATEMENT_TIMEOUT_S) bounds each MySQL read and write on the socket,
    ``connect_timeout`` (default CONNECT_TIMEOUT_S) each MySQL connect, and on SQLite ``statement_timeout``
    (default SQLITE_BUSY_TIMEOUT_S) how long a statement waits for another process's lock. Timeouts set in
    the URL's query (``?read_timeout=30``, ``?timeout=10`` on SQLite) win over these.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StorageUnavailable(f"bad database URL {url!r}: use sqlite:///PATH or "
                                 "mysql+pymysql://user:pw@host:3306/db?charset=utf8mb4") from exc
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_path(parsed)
        if path is not None:
            _private(lambda: create_private(path))   # 0600 before SQLite creates it with the umask's mode
        busy = statement_timeout if statement_timeout is not None else SQLITE_BUSY_TIMEOUT_S
        engine = create_engine(parsed, connect_args=_unless_in_url(parsed, {"timeout": busy}))
        event.listen(engine, "connect", _sqlite_pragmas)
        if path is not None:   # SQLite gives its -wal/-shm/-journal files the database's mode; make sure
            event.listen(engine, "connect", lambda *_: _private(lambda: _tighten_side_files(path)))
        return engine
    if parsed.get_backend_name() not in ("mysql", "mariadb"):
        raise StorageUnavailable(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or mysql+pymysql")
    statement = statement_timeout if statement_timeout is not None else STATEMENT_TIMEOUT_S
    connect = connect_timeout if connect_timeout is not None else CONNECT_TIMEOUT_S
    # A socket timeout fails the statement with OperationalError 2013 and drops the connection (the pool
    # replaces it).
    connect_args = _unless_in_url(parsed, {"connect_timeout": connect, "read_timeout": statement,
                                           "write_timeout": statement})
    if create_database and parsed.database:
        _ensure_mysql_database(parsed, connect_args)
    # pool_pre_ping: a server restart or idle timeout must not surface as an error on the next block.
    return create_engine(parsed, pool_pre_ping=True, pool_recycle=3600, connect_args=connect_args)


def _unless_in_url(parsed: URL, defaults: dict[str, Any]) -> dict[str, Any]:
    """``defaults`` less the keys the URL's query sets (connect_args would override the URL's own values)."""
    return {name: value for name, value in defaults.items() if name not in parsed.query}


def _sqlite_path(parsed: URL) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database or a ``file:`` URI."""
    name = parsed.database
    if not name or name == ":memory:" or name.startswith("file:") or parsed.query.get("uri"):
        return None
    return Path(name)


def _tighten_side_files(path: Path) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        tighten(path.with_name(path.name + suffix), PRIVATE_FILE)


def _private(make: Callable[[], object]) -> None:
    """Run a permission fix; a folder that is missing or not ours is left for SQLite to report, or to read."""
    try:
        make()
    except OSError as exc:
        log.warning("cannot make the database file private: %s", exc)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")      # readers do not block the background writer
    cursor.execute("PRAGMA synchronous=FULL")      # a committed block survives power loss
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _ensure_mysql_database(parsed: URL, connect_args: dict[str, Any]) -> None:
    name = parsed.database or ""
    if not name.replace("_", "").isalnum():
        raise StorageUnavailable(f"database name {name!r} must be letters, digits and underscores")
    # URL.set() ignores None, so it cannot drop the database name; _replace (NamedTuple) can.
    server = create_engine(parsed._replace(database=None), pool_pre_ping=True, connect_args=connect_args)
    try:
        with server.begin() as conn:
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS `{name}` CHARACTER SET utf8mb4"))
    except OperationalError as exc:
        raise StorageUnavailable(f"cannot reach MySQL at {parsed.host}:{parsed.port or 3306} "
                                 f"({exc.orig}); check the --db URL and that the server is running") from exc
    except SQLAlchemyError as exc:
        raise StorageUnavailable(f"cannot prepare database {name!r}: {exc}") from exc
    finally:
        server.dispose()
