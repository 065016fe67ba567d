"""Local training and evaluation as plain functions over tensors (no DataLoader, no worker processes).

Shuffling is the only randomness: epoch ``e`` visits ``torch.randperm(n, generator=g)`` batches where ``g`` is a CPU
``torch.Generator`` seeded once with ``seed``. bench/plain_fedavg.py mirrors this scheme exactly.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn


class TrainingCancelled(Exception):
    """Training stopped early because its ``cancel`` event was set (whoever asked for it no longer waits)."""


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    seed: int,
    device: str = "cpu",
    cancel: threading.Event | None = None,
) -> dict[str, float | int]:
    """Mini-batch SGD in place; returns the last epoch's running (on-the-fly) mean loss and accuracy, and the sample
    count. Setting ``cancel`` stops it before the next batch with TrainingCancelled (the model is then half
    trained: the caller reloads it before using it again)."""
    n = len(x)
    if n == 0:
        raise ValueError("cannot train on zero samples")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got {epochs} and {batch_size}")
    model.to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    generator = torch.Generator().manual_seed(seed)
    loss_sum, correct = 0.0, 0
    for epoch in range(epochs):
        loss_sum, correct = 0.0, 0
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            if cancel is not None and cancel.is_set():
                raise TrainingCancelled(f"training cancelled in epoch {epoch + 1} of {epochs}")
            batch = order[start:start + batch_size]
            xb, yb = x[batch].to(device), y[batch].to(device)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()  # type: ignore[no-untyped-call]  # torch ships this method without annotations
            optimizer.step()
            loss_sum += loss.item() * len(batch)
            correct += int((logits.argmax(1) == yb).sum())
    return {"loss": loss_sum / n, "accuracy": correct / n, "samples": n}


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1000, device: str = "cpu"
) -> dict[str, float | int]:
    """Mean cross-entropy and accuracy of the model on (x, y); zero samples give NaN loss and accuracy."""
    n = len(x)
    if n == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    model.to(device)
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return {"loss": loss_sum / n, "accuracy": correct / n, "samples": n}
