"""The participant seam: what a round asks of one trainer (fit, evaluate) over plain numpy weights. No torch here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class FitIns:
    """What the server asks of one client in one round."""

    round: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    seed: int  # the client's shuffling seed for this round, derived from (run seed, round, client index)


@dataclass(frozen=True)
class FitRes:
    """A client's answer: its updated shared weights, its sample count (the aggregation weight) and training metrics."""

    weights: dict[str, np.ndarray]
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    receipt: object | None = None  # evidence the layer above attaches and checks (the node's signed update record)


@dataclass(frozen=True)
class EvalRes:
    """A client's evaluation on its local test split."""

    loss: float
    accuracy: float
    samples: int


@runtime_checkable
class Participant(Protocol):
    """A trainer as the round loop sees it."""

    participant_id: str

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes: ...

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        """Personalized: the shared weights plus the client's own personal layers, on its local test split."""
        ...
