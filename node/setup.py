"""Build the FL pieces a run needs from a Config: data, client shares, model, strategy, participants."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from config import Config, local_test_fraction
from fl.data import Dataset, load_dataset
from fl.models import build_model, default_model_for
from fl.partition import local_split, partition
from fl.participant import InProcessParticipant, Workbench
from fl.strategy import FedAvg, make_strategy
from fl.weights import Weights, state_to_numpy


def configure_torch(cfg: Config) -> str:
    """Threads and device for this process; returns the device name."""
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return cfg.device


def model_name(cfg: Config) -> str:
    return default_model_for(cfg.dataset) if cfg.model == "auto" else cfg.model


def strategy_for(cfg: Config) -> FedAvg:
    return make_strategy(cfg.algo, lr=cfg.lr, local_epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                         momentum=cfg.momentum, fraction=cfg.fraction, seed=cfg.seed)


def initial_model(cfg: Config, dataset: Dataset) -> torch.nn.Module:
    """The round-0 model, initialised from the run's seed so every node and every rerun agrees."""
    torch.manual_seed(cfg.seed)
    return build_model(model_name(cfg), dataset.num_classes, dataset.input_shape)


def client_shares(cfg: Config, dataset: Dataset, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every client's (train indices, local test indices), seeded by the run's seed."""
    parts = partition(dataset.train_y.numpy(), count, cfg.partition, cfg.seed, alpha=cfg.alpha,
                      shards_per_client=cfg.shards_per_client)
    holdout = local_test_fraction(cfg)
    return [local_split(idx, holdout, cfg.seed + i) for i, idx in enumerate(parts)]


@dataclass
class Federation:
    """Everything an in-process run needs; participants share one Workbench (no model copy per client)."""

    dataset: Dataset
    strategy: FedAvg
    workbench: Workbench
    shared_keys: list[str]
    personal_keys: list[str]
    initial: Weights                    # the full round-0 state
    participants: list[InProcessParticipant]


def build_federation(cfg: Config, device: str = "cpu") -> Federation:
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    if cfg.clients > len(dataset.train_y):
        raise ValueError(f"{cfg.clients} clients but only {len(dataset.train_y)} training samples; "
                         "use fewer --clients")
    strategy = strategy_for(cfg)
    model = initial_model(cfg, dataset)
    initial = state_to_numpy(model)
    shared = strategy.shared_keys(model)
    personal = [k for k in initial if k not in set(shared)]
    bench = Workbench(model, device)
    personal_init = {k: initial[k] for k in personal} if personal else None
    participants = [InProcessParticipant(f"client-{i:03d}", dataset, tr, te, bench, shared, personal_init)
                    for i, (tr, te) in enumerate(client_shares(cfg, dataset, cfg.clients))]
    return Federation(dataset, strategy, bench, shared, personal, initial, participants)

