"""Sample-weighted model averaging (FedAvg's rule) as a pure function and as a streaming accumulator.

Floating tensors are averaged in float64 and cast back to their dtype. Integer (and bool) tensors are not
averaged: they are counters such as BatchNorm's ``num_batches_tracked``, where a weighted mean is a
fractional count that has to be rounded somehow and means nothing; the element-wise maximum is the count of
the replica that trained longest, keeps the dtype exactly, and does not depend on the sample weights.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Weights = dict[str, np.ndarray]


class Accumulator:
    """Folds (weights, samples) pairs one at a time in O(model) memory; ``result()`` equals ``weighted_average``."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self.count = 0
        self.total_samples = 0

    def add(self, weights: Mapping[str, np.ndarray], samples: int) -> None:
        """Fold one client's weights with its sample count (a non-negative int)."""
        if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
            raise ValueError(f"samples must be a non-negative integer, got {samples!r}")
        if not weights:
            raise ValueError("cannot aggregate an empty weight dict")
        if self.count == 0:
            self._start(weights)
        else:
            self._check(weights)
        for name, array in weights.items():
            array = np.asarray(array)
            if _is_float(array.dtype):
                self._sums[name] += array.astype(np.float64) * float(samples)
            else:
                np.maximum(self._sums[name], array, out=self._sums[name])
        self.count += 1
        self.total_samples += int(samples)

    def result(self) -> Weights:
        """The sample-weighted average, each tensor in its original dtype and C-contiguous."""
        if self.count == 0:
            raise ValueError("nothing to aggregate: no results were added")
        if self.total_samples == 0:
            raise ValueError("cannot weight by samples: every result reported zero samples")
        out: Weights = {}
        for name, acc in self._sums.items():
            dtype = self._dtypes[name]
            value = acc / float(self.total_samples) if _is_float(dtype) else acc
            out[name] = np.array(value, dtype=dtype, order="C", copy=True)
        return out

    def _start(self, weights: Mapping[str, np.ndarray]) -> None:
        for name, array in weights.items():
            array = np.asarray(array)
            self._dtypes[name] = array.dtype
            if _is_float(array.dtype):
                self._sums[name] = np.zeros(array.shape, dtype=np.float64)
            else:
                self._sums[name] = np.array(array, copy=True)

    def _check(self, weights: Mapping[str, np.ndarray]) -> None:
        if set(weights) != set(self._sums):
            diff = sorted(set(weights) ^ set(self._sums))
            raise ValueError(f"weights have different tensor names from the first result: {diff[:5]}")
        for name, array in weights.items():
            array = np.asarray(array)
            if array.shape != self._sums[name].shape:
                raise ValueError(f"tensor {name!r} has shape {array.shape}, first result had {self._sums[name].shape}")
            if array.dtype != self._dtypes[name]:
                raise ValueError(f"tensor {name!r} has dtype {array.dtype}, first result had {self._dtypes[name]}")


def weighted_average(items: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """Sample-weighted mean of (weights, samples) pairs; integer buffers take the element-wise max (see module doc)."""
    acc = Accumulator()
    for weights, samples in items:
        acc.add(weights, samples)
    return acc.result()


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)
