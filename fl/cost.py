"""What training a model costs: FLOPs per training sample, counted from its layers (the same number on any
machine), and this machine's effective training rate in GFLOP/s, measured."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch
from torch import nn

BACKWARD_FACTOR = 3   # forward + backward (gradients of inputs and of weights) ~ 3x the forward pass


def forward_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs (2 per multiply-accumulate) of one sample's forward pass through the convolutions and linear layers;
    activations, pooling and normalisation are a small share and not counted."""
    total = 0

    def conv(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Conv2d)
        kernel = math.prod(module.kernel_size) * (module.in_channels // module.groups)
        total += 2 * kernel * output[0].numel()

    def linear(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(module, nn.Linear)
        total += 2 * module.in_features * module.out_features

    hooks = []
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            hooks.append(layer.register_forward_hook(conv))
        elif isinstance(layer, nn.Linear):
            hooks.append(layer.register_forward_hook(linear))
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def train_flops_per_sample(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one training step per sample (forward and backward)."""
    return BACKWARD_FACTOR * forward_flops(model, input_shape)


def measure_gflops(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, batch_size: int = 32,
                   batches: int = 8, repeats: int = 5) -> float:
    """This machine's effective training rate for ``model`` in GFLOP/s: the median of ``repeats`` timings of
    ``batches`` SGD steps on random data (a copy of the model is trained; the given one is not touched)."""
    import copy
    probe = copy.deepcopy(model)
    probe.train()
    device = next(probe.parameters()).device
    optimiser = torch.optim.SGD(probe.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *input_shape), generator=generator).to(device)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimiser.zero_grad()
        loss_fn(probe(x), y).backward()
        optimiser.step()

    step()   # warm-up: allocations, kernel selection
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(batches):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - started)
    per_sample = statistics.median(timings) / (batches * batch_size)
    return train_flops_per_sample(model, input_shape) / per_sample / 1e9
