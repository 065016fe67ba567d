"""Shared fixtures: a fresh SQLite file or MariaDB database per test, and a helper that builds a real chain."""
from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError

from chain.block import Cosignature, SignedRecord, UpdateRecord
from chain.keys import NodeKey
from chain.tensors import model_hash
from chain.verify import Head
from node.ledger import CHECKPOINT_FILE, KEY_FILE, Ledger
from storage.store import CHUNK_BYTES, LedgerStore

MYSQL_URL_VAR = "FLEDGER_TEST_MYSQL_URL"
REQUIRE_MYSQL_VAR = "FLEDGER_REQUIRE_MYSQL"
TEST_DB_PREFIX = "fledger_t_"

# Every backend-parametrized test runs once per entry; the MySQL one carries the `mysql` mark.
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("mysql", id="mysql", marks=pytest.mark.mysql)]


def mysql_server_url() -> URL:
    """The server named by FLEDGER_TEST_MYSQL_URL, checked reachable; skip (or fail when required) otherwise."""
    required = os.environ.get(REQUIRE_MYSQL_VAR) == "1"
    raw = os.environ.get(MYSQL_URL_VAR)
    if not raw:
        message = f"set {MYSQL_URL_VAR} to run MySQL tests"
        if required:
            pytest.fail(f"{REQUIRE_MYSQL_VAR}=1 but {MYSQL_URL_VAR} is unset", pytrace=False)
        pytest.skip(message)
    url = make_url(raw)
    engine = create_engine(url._replace(database=None))
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        message = f"MySQL server of {MYSQL_URL_VAR} is unreachable: {exc.orig}"
        if required:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    finally:
        engine.dispose()
    return url


def mysql_admin_execute(server: URL, *statements: str) -> None:
    """Run statements on the server without selecting a database."""
    engine = create_engine(server._replace(database=None))
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()


@contextmanager
def fresh_database(kind: str, directory: Path) -> Iterator[str]:
    """A URL to an empty database of ``kind`` ("sqlite" or "mysql"), removed afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{directory}/ledger.db"
        return
    server = mysql_server_url()
    name = f"{TEST_DB_PREFIX}{uuid.uuid4().hex[:8]}"
    mysql_admin_execute(server, f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        mysql_admin_execute(server, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(params=BACKENDS)
def backend(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database URL: a SQLite file under tmp_path, or a uniquely named MariaDB database."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


# ---- building a real chain --------------------------------------------------------------------------------------

GENESIS_TIME_MS = 1_700_000_000_000
PARAMS = {"lr": "0.05", "local_epochs": 1, "batch_size": 32}


def trainer_keys(count: int, seed: int = 0) -> list[NodeKey]:
    return [NodeKey.from_seed(f"trainer-{seed}-{i}".encode()) for i in range(count)]


def global_weights(round_: int, tensor_shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    """Small deterministic 'model' for a round: a weight matrix and a bias."""
    rng = np.random.default_rng([seed, round_])
    return {"layer.weight": rng.standard_normal(tensor_shape).astype(np.float32),
            "layer.bias": rng.standard_normal(tensor_shape[:1]).astype(np.float32)}


def signed_records(round_: int, base_model_hash: str, keys: list[NodeKey], seed: int = 0) -> list[SignedRecord]:
    """One signed update record per trainer key for a round starting from ``base_model_hash``."""
    out = []
    for i, key in enumerate(keys):
        update = {"delta": np.full((4,), i + round_, dtype=np.float32), "trainer": np.array(i + seed)}
        record = UpdateRecord(round=round_, trainer_id=key.node_id, trainer_key=key.public_hex,
                              base_model_hash=base_model_hash, update_hash=model_hash(update),
                              samples=100 + 10 * i + round_, metrics={"loss_micro": 1_000_000 - 1000 * round_ - i})
        out.append(SignedRecord.create(record, key))
    return out


def build_chain(url: str, n_blocks: int = 6, trainers: int = 3, tensor_shape: tuple[int, ...] = (64, 32), *,
                data_dir: Path | None = None, key: NodeKey | None = None, chunk_bytes: int = CHUNK_BYTES,
                cosigners: int = 0, seed: int = 0) -> tuple[Path, Path, list[Head]]:
    """Build a real chain of ``n_blocks`` blocks (genesis + n_blocks-1 rounds) through ``node.ledger.Ledger``.

    Round blocks carry one signed UpdateRecord per trainer. The proposer co-signs every round block; ``cosigners``
    extra keys co-sign every block and are, with the proposer, the validator set genesis names (so each round block
    is final: all validators co-signed it).
    The node key is kept in ``data_dir`` (a new temporary folder by default) so the chain can be reopened
    with ``Ledger.open(data_dir, url)``; the checkpoint lands there too. Returns (data dir, checkpoint path,
    the Head of every block in height order). The ledger is flushed and closed before returning.
    """
    data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="fledger-chain-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    key = key or NodeKey.load_or_create(data_dir / KEY_FILE)
    keys = trainer_keys(trainers, seed)
    cosigner_keys = [NodeKey.from_seed(f"cosigner-{seed}-{i}".encode()) for i in range(cosigners)]
    ledger = Ledger(LedgerStore(url, chunk_bytes=chunk_bytes), key, data_dir / CHECKPOINT_FILE)
    heads: list[Head] = []
    try:
        for round_ in range(n_blocks):
            weights = global_weights(round_, tensor_shape, seed)
            base = ledger.head.model_hash if ledger.head else model_hash(weights)
            records = signed_records(round_, base, keys, seed) if round_ else []
            params = PARAMS if round_ or not cosigner_keys else \
                {**PARAMS, "validators": sorted(k.public_hex for k in [key, *cosigner_keys])}
            built = ledger.build(round=round_, algorithm="fedavg", params=params, weights=weights, records=records,
                                 metrics={"accuracy_bp": 5000 + 100 * round_},
                                 timestamp_ms=GENESIS_TIME_MS + 1000 * round_)
            signers = [key, *cosigner_keys] if round_ else cosigner_keys
            built = built.cosigned(Cosignature.create(round_, built.block.hash, k) for k in signers)
            ledger.accept(built)
            heads.append(built.head)
        ledger.flush()
    finally:
        ledger.close()
    return data_dir, data_dir / CHECKPOINT_FILE, heads


# ---- one built chain per backend, copied fresh for every test that damages it ------------------------------------

LEDGER_TABLES = ("blocks", "update_records", "model_chunks", "cosignatures", "client_state")
TEMPLATE_BLOCKS = 6
TEMPLATE_CHUNK_BYTES = 4096      # a (64, 32) float32 model then spans 3 chunks, so chunks can be swapped


class ChainTemplate:
    """A chain built once: its database URL, backend kind, checkpoint file and block heads."""

    def __init__(self, kind: str, url: str, checkpoint: Path, heads: list[Head]):
        self.kind, self.url, self.checkpoint, self.heads = kind, url, checkpoint, heads

    @contextmanager
    def copy(self, directory: Path) -> Iterator[str]:
        """A URL to an independent copy of the template database, removed afterwards."""
        if self.kind == "sqlite":
            source = Path(make_url(self.url).database)
            target = directory / "copy.db"
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{source}{suffix}").exists():
                    target.with_name(target.name + suffix).write_bytes(Path(f"{source}{suffix}").read_bytes())
            yield f"sqlite:///{target}"
            return
        server = make_url(self.url)
        source, name = server.database, f"{TEST_DB_PREFIX}{uuid.uuid4().hex[:8]}"
        statements = [f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"]
        for table in LEDGER_TABLES:
            statements += [f"CREATE TABLE `{name}`.`{table}` LIKE `{source}`.`{table}`",
                           f"INSERT INTO `{name}`.`{table}` SELECT * FROM `{source}`.`{table}`"]
        mysql_admin_execute(server, *statements)
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            mysql_admin_execute(server, f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture(scope="module", params=BACKENDS)
def chain_template(request, tmp_path_factory) -> Iterator[ChainTemplate]:
    """A 6-block chain (3 signed records and one co-signature per round block, 3 weight chunks per block),
    built once per backend and module. Tests must not change it: use ``chain_copy``."""
    directory = tmp_path_factory.mktemp(f"template-{request.param}")
    with fresh_database(request.param, directory) as url:
        _data_dir, checkpoint, heads = build_chain(url, TEMPLATE_BLOCKS, trainers=3, data_dir=directory / "node",
                                                   chunk_bytes=TEMPLATE_CHUNK_BYTES, cosigners=1)
        yield ChainTemplate(request.param, url, checkpoint, heads)


@pytest.fixture
def chain_copy(chain_template, tmp_path) -> Iterator[str]:
    """A fresh copy of the template chain that a test may damage."""
    with chain_template.copy(tmp_path) as url:
        yield url


@contextmanager
def raw_connection(url: str):
    """A plain SQLAlchemy connection in a transaction that commits on exit: no store, no foreign-key checks."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            if engine.dialect.name in ("mysql", "mariadb"):
                conn.execute(text("SET FOREIGN_KEY_CHECKS=0"))
            yield conn
    finally:
        engine.dispose()


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` every 50 ms until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
