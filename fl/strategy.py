"""Strategies: which clients train each round, with what instructions, which tensors they share, and how their
results are aggregated (FedAvg, FedPer). The round engine asks the strategy, never an aggregation rule directly."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from fl.aggregate import Accumulator, Weights
from fl.participant import FitIns

if TYPE_CHECKING:   # torch only where a model is at hand: the round engine and the console need no torch for this
    from torch import nn


class Aggregator(Protocol):
    """Folds results one at a time (in a fixed order); ``result()`` is the aggregate."""

    count: int
    total_samples: int

    def add(self, weights: Mapping[str, np.ndarray], samples: int) -> None: ...

    def result(self) -> Weights: ...


class Strategy(Protocol):
    """What the round engine asks of an FL algorithm."""

    name: str
    seed: int

    def shared_keys(self, model: nn.Module) -> list[str]: ...

    def select(self, round: int, participant_ids: Sequence[str]) -> list[str]: ...

    def fit_ins(self, round: int, position: int) -> FitIns: ...

    def aggregator(self) -> Aggregator: ...

    def combine(self, aggregates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Weights: ...

    def params(self) -> dict[str, str]: ...


def client_seed(seed: int, round: int, client_index: int) -> int:
    """A distinct, reproducible 32-bit shuffling seed for one client in one round of one run."""
    return int(np.random.SeedSequence([seed, round, client_index]).generate_state(1, dtype=np.uint32)[0])


def _decimal(value: float | int | str) -> str:
    """A number as a plain decimal string (no exponent, no binary float noise): 0.05 -> "0.05"."""
    if isinstance(value, float):
        value = repr(value)
    return format(Decimal(str(value)), "f")


@dataclass(frozen=True)
class FedAvg:
    """McMahan et al. 2017: every selected client trains the whole model; the server averages all of it."""

    lr: float = 0.05
    local_epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.0
    fraction: float = 1.0  # C: share of clients selected each round
    seed: int = 0
    name: ClassVar[str] = "fedavg"

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State keys clients receive and return: all of them."""
        return list(model.state_dict())

    def select(self, round: int, participant_ids: Sequence[str]) -> list[str]:
        """max(1, floor(C*K)) clients drawn with an RNG seeded by (seed, round), kept in the given order; C=1 -> all."""
        fraction, seed = self.fraction, self.seed
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        if not participant_ids:
            raise ValueError("no participants to select from")
        ids = list(participant_ids)
        if fraction >= 1.0:
            return ids
        m = max(1, math.floor(fraction * len(ids) + 1e-9))
        chosen = np.random.default_rng([seed, round]).choice(len(ids), size=m, replace=False)
        return [ids[i] for i in sorted(int(i) for i in chosen)]

    def fit_ins(self, round: int, position: int) -> FitIns:
        """Instructions for the client at ``position`` in the round's selection (which is in data-share order)."""
        return FitIns(round=round, epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                      momentum=self.momentum, seed=client_seed(self.seed, round, position))

    def aggregator(self) -> Aggregator:
        """How one super node folds its edge nodes' results: the sample-weighted average, streamed."""
        return Accumulator()

    def combine(self, aggregates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
        """The entry over the super nodes' aggregates (each with its sample total), in the order given: their
        sample-weighted average, which is the average over all their edge nodes. A single aggregate is taken
        as is, so one super node gives exactly the bits of a flat average."""
        if len(aggregates) == 1:
            return {k: v for k, v in aggregates[0][0].items()}
        acc = Accumulator()
        for weights, samples in aggregates:
            acc.add(weights, samples)
        return acc.result()

    def params(self) -> dict[str, str]:
        """Hyperparameters as decimal strings, fit for canonical (float-free) JSON on the ledger."""
        return {
            "strategy": self.name,
            "lr": _decimal(self.lr),
            "local_epochs": _decimal(self.local_epochs),
            "batch_size": _decimal(self.batch_size),
            "momentum": _decimal(self.momentum),
            "fraction": _decimal(self.fraction),
            "seed": _decimal(self.seed),
        }


@dataclass(frozen=True)
class FedPer(FedAvg):
    """Arivazhagan et al. 2019: clients share the base layers and keep their personal (classifier) layers local."""

    name: ClassVar[str] = "fedper"

    def shared_keys(self, model: nn.Module) -> list[str]:
        """State keys clients receive and return: the base layers only."""
        from fl.models import split_keys
        return split_keys(model)[0]


STRATEGIES: dict[str, type[FedAvg]] = {"fedavg": FedAvg, "fedper": FedPer}


def make_strategy(name: str, **hyper: Any) -> FedAvg:
    """A strategy by name with optional hyperparameters (lr, local_epochs, batch_size, momentum, fraction, seed)."""
    if name.lower() not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name.lower()](**hyper)
