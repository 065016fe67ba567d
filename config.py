"""Every setting with its default, overridable by a config file, FLEDGER_* environment variables and flags.

Precedence, lowest to highest: defaults < file (TOML or JSON) < environment < command-line flags.
The original project's keys (``client.amount``, ``local_epoch``, ``gobal_epoch``, ``learn_rate``, ...)
are accepted as aliases. Unknown keys and values of the wrong type are refused with a message naming the key.
"""
from __future__ import annotations

import json
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomllib

ENV_PREFIX = "FLEDGER_"
# FLEDGER_* variables that configure the test harness (see tests/conftest.py) or name a node's parent process
# (node/process/__init__.py PARENT_ENV), not a node: never settings.
NOT_SETTINGS = ("FLEDGER_TEST_", "FLEDGER_REQUIRE_", "FLEDGER_PARENT_PID")
DATASETS = ("mnist", "cifar")
ALGORITHMS = ("fedavg", "fedper")
PARTITIONS = ("iid", "shards", "dirichlet")
NODE_TYPES = ("SN", "EN")


class ConfigError(ValueError):
    """A setting is unknown, mistyped or out of range."""


@dataclass(frozen=True)
class Config:
    # --- federated learning -----------------------------------------------------------------------
    dataset: str = "mnist"              # mnist | cifar; mnist without data_dir = offline 5,000-image sample
    data_dir: str | None = None         # folder with the standard dataset files
    download: bool = False              # fetch the dataset into data_dir when missing (needs internet)
    model: str = "auto"                 # auto | cnn | 2nn | cifar-cnn
    algo: str = "fedavg"                # fedavg | fedper
    clients: int = 10                   # number of simulated clients (client.amount)
    rounds: int = 10                    # global rounds (gobal_epoch / global_epoch)
    fraction: float = 1.0               # client fraction C sampled per round
    local_epochs: int = 1               # E (local_epoch)
    batch_size: int = 32                # B (BATCH_SIZE)
    lr: float = 0.05                    # learning rate (learn_rate)
    momentum: float = 0.0
    partition: str = "iid"             # iid | shards | dirichlet
    alpha: float = 0.5                  # Dirichlet concentration
    shards_per_client: int = 2
    local_test_fraction: float | None = None  # share of each client's data kept for personalised evaluation;
                                        # None: 0.2 under fedper or eval_local, else 0 (FedAvg trains on all of it)
    eval_global: bool = True            # evaluate the global model each round (openEval)
    eval_local: bool = False            # evaluate every client's personalised model each round (local_OpenEval)
    seed: int = 0
    threads: int = 0                    # torch intra-op threads; 0 = all cores
    device: str = "cpu"                 # cpu | cuda | auto
    # --- ledger -----------------------------------------------------------------------------------
    db: str | None = None               # SQLAlchemy URL; default a SQLite file in the data root
    data_root: str = "fledger-data"     # this node's own directory: key, database, checkpoint, outputs
    reproducible: bool = False          # logical block timestamps, so equal seeds give equal block hashes
    # --- network ----------------------------------------------------------------------------------
    ip: str = "127.0.0.1"               # address to bind; 0.0.0.0 only when asked
    port: int = 8080
    advertise: str | None = None        # HOST:PORT peers use to reach this node
    entry: str | None = None            # HOST:PORT of the entry super node
    node_type: str = "SN"               # SN | EN (--nt)
    is_entry: bool = False              # this SN is the entry: creates genesis, keeps the SN registry (-z)
    partition_index: int = 0            # an EN's share: index i of partition_count
    partition_count: int = 1
    hosted_edges: int = 1               # an EN process hosts this many edge nodes: shares index..index+n-1
    heartbeat_s: float = 2.0            # interval between heartbeats
    dead_after_s: float = 10.0          # a member silent this long is dropped
    max_edges_per_sn: int = 64          # an SN refuses edge nodes beyond this
    round_timeout_s: float | None = None  # longest a round may take: calls are cut after it, and a validator
                                        # takes over from a proposer silent this long; None: from the settings
    retry_for_s: float = 300.0          # a failing round is retried (with backoff) this long; 0: stop at once
    # --- adversaries and defences (see README, "Attacks and robust aggregation") ---------------------------
    aggregate: str = "fedavg"           # fedavg | median | trimmed-mean[:beta=B] | multi-krum[:f=F,m=M] |
                                        # clip:norm=C, clip combinable: "clip:norm=5+median"
    max_update_norm: float | None = None  # refuse an update farther than this (L2) from the round's base
    record_updates: bool = False        # store every update with its block, for `verify --recompute`
    attack: str | None = None           # NAME[:key=value,...]: the attack of the malicious edge nodes
    attackers: float = 0.0              # simulate: the share of edge nodes that attack, drawn from the seed
    # --- edge network conditions (see README, "Scenarios") ----------------------------------------------
    scenario: str | None = None         # a scenario TOML file: devices, links, availability, deadline
    shape_links: bool = True            # network: spend each link profile's time for real (off: the kernel shapes)
    host_gflops: float | None = None    # pins this machine's training rate for a scenario's relative devices
    share_size: int | None = None       # simulate: images per client, shares drawn with overlap (1,000 x 40 of 4,000)
    # --- security (see README, "Secure mode") -------------------------------------------------------
    secure: bool = False                # mutual TLS and admission by join token (default off loopback)
    insecure: bool = False              # allow open mode on a non-loopback address
    join: str | None = None             # join token, or @FILE holding one (a node's first start in secure mode)
    join_port: int | None = None        # entry: port serving joins (default: its port + 1)
    join_address: str | None = None     # joining node: HOST:PORT of the entry's join port (default: entry port + 1)


ALIASES = {
    "client.amount": "clients", "client_amount": "clients", "local_epoch": "local_epochs",
    "local_OpenEval": "eval_local", "gobal_epoch": "rounds", "global_epoch": "rounds",
    "openEval": "eval_global", "learn_rate": "lr", "BATCH_SIZE": "batch_size", "nt": "node_type",
}
_FIELDS = {f.name: f for f in fields(Config)}
_ENV_ALIASES = {alias.lower().replace(".", "_"): alias for alias in ALIASES}


def _base_type(name: str) -> tuple[type, bool]:
    hint = typing.get_type_hints(Config)[name]
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def canonical_key(key: str) -> str:
    name = ALIASES.get(key, key)
    if name not in _FIELDS:
        raise ConfigError(f"unknown setting {key!r}; known settings: {', '.join(_FIELDS)}")
    return name


def _typed(key: str, value: Any) -> Any:
    """Check a value from a file or a flag (already typed) against the field's type."""
    name = canonical_key(key)
    kind, optional = _base_type(name)
    if value is None and optional:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"setting {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _parsed(key: str, text: str, label: str) -> Any:
    """Parse a value given as text (an environment variable called ``label``)."""
    try:
        name = canonical_key(key)
    except ConfigError:
        raise ConfigError(f"unknown setting in environment variable {label}") from None
    kind, optional = _base_type(name)
    if optional and text == "":
        return None
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes", "on")
        return kind(text)
    except ValueError:
        raise ConfigError(f"{label} must be {kind.__name__}, got {text!r}") from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, Mapping) and full not in ALIASES and full not in _FIELDS:
            out.update(_flatten(value, f"{full}."))
        else:
            out[full] = value
    return out


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Settings from a TOML or JSON file, nested tables flattened to dotted keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: "
                          f"{exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table of settings")
    return _flatten(data)


def load_config(file: str | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None) -> Config:
    """Defaults, then the file, then FLEDGER_* variables, then flags whose value is not None."""
    values: dict[str, Any] = {}
    if file:
        for key, value in read_file(file).items():
            values[canonical_key(key)] = _typed(key, value)
    for var, text in (os.environ if env is None else env).items():
        if var.startswith(ENV_PREFIX) and not var.startswith(NOT_SETTINGS):
            key = var[len(ENV_PREFIX):].lower()
            key = _ENV_ALIASES.get(key, key)   # environment names are upper case: FLEDGER_OPENEVAL -> openEval
            values[canonical_key(key)] = _parsed(key, text, var)
    for key, value in (flags or {}).items():
        if value is not None:
            values[canonical_key(key)] = _typed(key, value)
    return validate(replace(Config(), **values))


def validate(cfg: Config) -> Config:
    checks = [
        ("dataset", cfg.dataset in DATASETS, f"one of {', '.join(DATASETS)}"),
        ("algo", cfg.algo in ALGORITHMS, f"one of {', '.join(ALGORITHMS)}"),
        ("partition", cfg.partition in PARTITIONS, f"one of {', '.join(PARTITIONS)}"),
        ("node_type", cfg.node_type in NODE_TYPES, "SN or EN"),
        ("clients", cfg.clients >= 1, "at least 1"),
        ("rounds", cfg.rounds >= 0, "0 or more"),
        ("local_epochs", cfg.local_epochs >= 1, "at least 1"),
        ("batch_size", cfg.batch_size >= 1, "at least 1"),
        ("lr", cfg.lr > 0, "greater than 0"),
        ("fraction", 0 < cfg.fraction <= 1, "in (0, 1]"),
        ("alpha", cfg.alpha > 0, "greater than 0"),
        ("local_test_fraction", cfg.local_test_fraction is None or 0 <= cfg.local_test_fraction < 1,
         "in [0, 1)"),
        ("port", 0 <= cfg.port <= 65535, "a port number"),
        ("join_port", cfg.join_port is None or 0 <= cfg.join_port <= 65535, "a port number"),
        ("partition_index", 0 <= cfg.partition_index < max(cfg.partition_count, 1),
         "in 0..partition_count-1"),
        ("hosted_edges", cfg.hosted_edges >= 1
         and cfg.partition_index + cfg.hosted_edges <= max(cfg.partition_count, 1),
         "at least 1, with partition_index + hosted_edges <= partition_count"),
        ("device", cfg.device in ("cpu", "cuda", "auto"), "cpu, cuda or auto"),
        ("round_timeout_s", cfg.round_timeout_s is None or 1 <= cfg.round_timeout_s <= 86400, "in [1, 86400]"),
        ("retry_for_s", 0 <= cfg.retry_for_s <= 7 * 86400, "in [0, 604800]"),
        ("max_update_norm", cfg.max_update_norm is None or cfg.max_update_norm > 0, "greater than 0"),
        ("attackers", 0 <= cfg.attackers <= 1, "in [0, 1]"),
        ("share_size", cfg.share_size is None or cfg.share_size >= 1, "at least 1"),
        ("host_gflops", cfg.host_gflops is None or cfg.host_gflops > 0, "greater than 0"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"setting {key!r} must be {expected}, got {getattr(cfg, key)!r}")
    from fl.attacks import parse_attack  # numpy only; parsed here so a bad spec stops a run before it starts
    from fl.robust import parse_rule
    try:
        parse_rule(cfg.aggregate)
    except ValueError as exc:
        raise ConfigError(f"setting 'aggregate': {exc}") from None
    if cfg.attack is not None:
        try:
            parse_attack(cfg.attack)
        except ValueError as exc:
            raise ConfigError(f"setting 'attack': {exc}") from None
    if cfg.share_size is not None and cfg.partition != "iid":
        raise ConfigError(f"setting 'share_size' draws overlapping IID shares; it does not combine with partition "
                          f"{cfg.partition!r} (leave --partition at iid)")
    if cfg.attackers > 0 and cfg.attack is None:
        raise ConfigError("setting 'attackers' needs an attack: pass --attack NAME as well")
    return cfg


def local_test_fraction(cfg: Config) -> float:
    """The hold-out share actually used (see the field's comment)."""
    if cfg.local_test_fraction is not None:
        return cfg.local_test_fraction
    return 0.2 if cfg.algo == "fedper" or cfg.eval_local else 0.0
