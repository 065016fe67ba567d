"""What a super node needs of the FL engine, built from its Config: the strategy, the run's parameters, the dataset
and an evaluation model (loaded on first use)."""
from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from config import Config
from fl.data import Dataset, load_dataset
from fl.strategy import FedAvg
from fl.train import evaluate as evaluate_model
from fl.weights import load_numpy, state_to_numpy
from node.setup import initial_model, strategy_for


@dataclass
class _FedView:
    """What node.simulator.run_params reads from a Federation (the network has no Federation)."""

    strategy: FedAvg
    dataset: Dataset


class RunContext:
    """Strategy, run parameters and (loaded on first use) the dataset and an evaluation model, from a Config."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.strategy = strategy_for(cfg)
        self._lock = threading.Lock()
        self._dataset: Dataset | None = None
        self._model = None

    @property
    def dataset(self) -> Dataset:
        with self._lock:
            if self._dataset is None:
                self._dataset = load_dataset(self.cfg.dataset, self.cfg.data_dir, self.cfg.download)
                self._model = initial_model(self.cfg, self._dataset)
            return self._dataset

    def params(self) -> dict[str, str]:
        """The simulator's run parameters, so a network chain records the same run as a simulated one."""
        from node.simulator import run_params  # the simulator module pulls in tqdm/matplotlib paths lazily
        return run_params(self.cfg, _FedView(self.strategy, self.dataset))  # type: ignore[arg-type]

    def genesis_weights(self) -> dict[str, np.ndarray]:
        """The shared keys of the seeded initial model (FedPer: base layers)."""
        model = initial_model(self.cfg, self.dataset)
        state = state_to_numpy(model)
        return {k: state[k] for k in self.strategy.shared_keys(model)}

    def evaluate_global(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Accuracy and loss on the global test set; {} when the weights are not a whole model (FedPer)."""
        data = self.dataset
        with self._lock:
            if set(weights) != set(self._model.state_dict()):
                return {}
            load_numpy(self._model, weights, strict_keys=True)
            m = evaluate_model(self._model, data.test_x, data.test_y, device="cpu")
        return {"accuracy": float(m["accuracy"]), "loss": float(m["loss"])}

    @property
    def personalised(self) -> bool:
        """Edge nodes keep personal layers (FedPer) or per-edge evaluation was asked for."""
        return self.strategy.name == "fedper" or self.cfg.eval_local

    def timestamp(self, round: int) -> int:
        return round * 1000 if self.cfg.reproducible else int(time.time() * 1000)
