"""In-process trainers: one shared model (the Workbench) that simulated clients borrow in turn."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from fl.aggregate import Weights
from fl.data import Dataset
from fl.participant import EvalRes, FitIns, FitRes
from fl.train import evaluate as evaluate_model
from fl.train import train as train_model
from fl.weights import load_numpy, state_to_numpy

log = logging.getLogger(__name__)


class Workbench:
    """The one model a process trains on; participants borrow it in turn (under its lock) instead of owning copies."""

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.model = model.to(device)
        self.device = device
        self.lock = threading.Lock()
        self.keys = tuple(model.state_dict())


class InProcessParticipant:
    """A simulated client: index tensors into a shared dataset, its personal layers (FedPer) and a shared Workbench."""

    def __init__(
        self,
        participant_id: str,
        dataset: Dataset,
        train_idx: np.ndarray,
        test_idx: np.ndarray,
        workbench: Workbench,
        shared_keys: Iterable[str],
        personal: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.participant_id = participant_id
        self._dataset = dataset
        self._train_idx = torch.as_tensor(np.asarray(train_idx, dtype=np.int64))
        self._test_idx = torch.as_tensor(np.asarray(test_idx, dtype=np.int64))
        self._bench = workbench
        self.shared_keys = tuple(shared_keys)
        unknown = set(self.shared_keys) - set(workbench.keys)
        if unknown:
            raise ValueError(f"shared keys not in the model: {sorted(unknown)[:5]}")
        self.personal_keys = tuple(k for k in workbench.keys if k not in set(self.shared_keys))
        self._personal: Weights | None = None
        if self.personal_keys:
            if personal is None:
                raise ValueError(f"participant {participant_id} keeps personal layers {self.personal_keys[:2]}...; "
                                 "pass their initial weights")
            self.set_personal_state(personal)

    @property
    def num_train_samples(self) -> int:
        return len(self._train_idx)

    @property
    def num_classes(self) -> int:
        """How many classes the dataset's labels name."""
        return self._dataset.num_classes

    @property
    def train_indices(self) -> np.ndarray:
        """The indices of this client's training samples in the shared dataset (a copy)."""
        return self._train_idx.numpy().copy()

    @property
    def workbench(self) -> Workbench:
        """The model this client borrows for training and evaluation."""
        return self._bench

    def personal_state(self) -> Weights | None:
        """A copy of this client's personal layers (None under FedAvg), e.g. to save for a resumed run."""
        return None if self._personal is None else {k: v.copy() for k, v in self._personal.items()}

    def set_personal_state(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace the personal layers (names must be exactly the personal keys; shapes/dtypes are checked on use)."""
        if set(weights) != set(self.personal_keys):
            raise ValueError(f"personal state must have exactly the keys {list(self.personal_keys)}, "
                             f"got {sorted(weights)}")
        self._personal = {k: np.array(weights[k], order="C", copy=True) for k in self.personal_keys}

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns, cancel: threading.Event | None = None,
            label_map: np.ndarray | None = None) -> FitRes:
        """Train the shared weights (plus own personal layers) locally; return only the shared keys. Setting
        ``cancel`` stops training between batches with fl.train.TrainingCancelled (personal layers unchanged).
        With ``label_map`` it trains on label ``label_map[y]`` instead of ``y`` (a label-flipping attacker)."""
        x, y = self._dataset.train_x[self._train_idx], self._dataset.train_y[self._train_idx]
        if label_map is not None:
            y = torch.as_tensor(np.asarray(label_map, dtype=np.int64))[y]
        with self._bench.lock:
            self._load(weights)
            metrics = train_model(
                self._bench.model, x, y, epochs=ins.epochs, batch_size=ins.batch_size, lr=ins.lr,
                momentum=ins.momentum, seed=ins.seed, device=self._bench.device, cancel=cancel,
            )
            shared = state_to_numpy(self._bench.model, self.shared_keys)
            if self.personal_keys:
                self._personal = state_to_numpy(self._bench.model, self.personal_keys)
        log.debug("%s round %d: loss %.4f acc %.4f", self.participant_id, ins.round, metrics["loss"],
                  metrics["accuracy"])
        return FitRes(weights=shared, samples=int(metrics["samples"]),
                      metrics={"loss": float(metrics["loss"]), "accuracy": float(metrics["accuracy"])})

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        """The given shared weights with this client's personal layers, on its local test split."""
        x, y = self._dataset.train_x[self._test_idx], self._dataset.train_y[self._test_idx]
        with self._bench.lock:
            self._load(weights)
            metrics = evaluate_model(self._bench.model, x, y, device=self._bench.device)
        return EvalRes(loss=float(metrics["loss"]), accuracy=float(metrics["accuracy"]),
                       samples=int(metrics["samples"]))

    def _load(self, weights: Mapping[str, np.ndarray]) -> None:
        missing = [k for k in self.shared_keys if k not in weights]
        if missing:
            raise ValueError(f"weights sent to {self.participant_id} lack shared tensors {missing[:5]}")
        state = {k: weights[k] for k in self.shared_keys}
        if self._personal is not None:
            state.update(self._personal)
        load_numpy(self._bench.model, state, strict_keys=True)
