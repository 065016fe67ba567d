"""The model zoo: McMahan et al. 2017's MNIST CNN and 2NN, a small CIFAR-10 CNN, and FedPer's base/personal key split.

Initialization draws from torch's global RNG: call ``torch.manual_seed(seed)`` right before ``build_model`` so every
node that builds the initial global model from the run's seed gets bit-identical weights.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class McMahanCNN(nn.Module):
    """Two 5x5 conv layers (32, 64 channels) with 2x2 max-pooling, fc 512, softmax output; 1,663,370 parameters on
    MNIST."""

    personal_prefixes: tuple[str, ...] = ("fc2.",)

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(64 * (height // 4) * (width // 4), 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        out: Tensor = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return out


class McMahan2NN(nn.Module):
    """Multilayer perceptron with two hidden layers of 200 ReLU units; 199,210 parameters on MNIST."""

    personal_prefixes: tuple[str, ...] = ("fc3.",)

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 28, 28)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))
        return out


class CifarCNN(nn.Module):
    """TensorFlow-tutorial style CIFAR-10 CNN (conv 64, conv 64 + BatchNorm, fc 384, 192); BatchNorm exercises
    buffers."""

    personal_prefixes: tuple[str, ...] = ("fc3.",)

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32)) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=5)
        self.conv2 = nn.Conv2d(64, 64, kernel_size=5)
        self.bn2 = nn.BatchNorm2d(64)
        side_h, side_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(64 * side_h * side_w, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        out: Tensor = self.fc3(F.relu(self.fc2(F.relu(self.fc1(x.flatten(1))))))
        return out


MODELS: dict[str, type[nn.Module]] = {"cnn": McMahanCNN, "2nn": McMahan2NN, "cifar-cnn": CifarCNN}
_DEFAULTS = {"mnist": "cnn", "cifar": "cifar-cnn", "cifar10": "cifar-cnn"}
_DEFAULT_SHAPES = {"cnn": (1, 28, 28), "2nn": (1, 28, 28), "cifar-cnn": (3, 32, 32)}


def build_model(name: str, num_classes: int = 10, input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A fresh model by name; seed torch (``torch.manual_seed``) first for a reproducible initialization."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    shape = tuple(input_shape) if input_shape is not None else _DEFAULT_SHAPES[name]
    return MODELS[name](num_classes=num_classes, input_shape=shape)


def default_model_for(dataset_name: str) -> str:
    """The model a dataset uses when none is named."""
    if dataset_name not in _DEFAULTS:
        raise ValueError(f"no default model for dataset {dataset_name!r}; choose one of: {', '.join(_DEFAULTS)}")
    return _DEFAULTS[dataset_name]


def split_keys(model: nn.Module) -> tuple[list[str], list[str]]:
    """State keys split into (base, personal) by the model's ``personal_prefixes`` (FedPer's personalization layers)."""
    prefixes = tuple(getattr(model, "personal_prefixes", ()))
    keys = list(model.state_dict())
    personal = [k for k in keys if prefixes and k.startswith(prefixes)]
    base = [k for k in keys if k not in personal]
    return base, personal
