"""Tests for fl.aggregate: hand-computed weighted means, the integer-buffer rule, errors and streaming == batch."""
from __future__ import annotations

import numpy as np
import pytest

from fl.aggregate import Accumulator, weighted_average


def test_weighted_mean_of_two_clients() -> None:
    out = weighted_average([({"w": np.array([1.0, 2.0], np.float32)}, 1), ({"w": np.array([3.0, 4.0], np.float32)}, 3)])
    assert out["w"].dtype == np.float32 and out["w"].tolist() == [2.5, 3.5]


def test_zero_sample_result_has_no_weight() -> None:
    out = weighted_average([({"w": np.array([9.0], np.float32)}, 0), ({"w": np.array([1.0], np.float32)}, 5)])
    assert out["w"].tolist() == [1.0]


def test_integer_buffers_take_the_maximum_not_the_mean() -> None:
    items = [({"n": np.array(10, np.int64)}, 100), ({"n": np.array(30, np.int64)}, 1),
             ({"n": np.array(20, np.int64)}, 1)]
    out = weighted_average(items)
    assert out["n"].dtype == np.int64 and out["n"].shape == () and int(out["n"]) == 30


def test_average_is_computed_in_float64_then_cast() -> None:
    big, small = np.float32(16777216.0), np.float32(1.0)  # 2**24: float32 alone would lose the +1s
    items = [({"w": np.array([big], np.float32)}, 1)] + [({"w": np.array([small], np.float32)}, 1)] * 2
    expected = np.float32((16777216.0 + 2.0) / 3.0)
    assert weighted_average(items)["w"][0] == expected


def test_streaming_equals_batch_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    items = [({"a": rng.standard_normal((5, 7)).astype(np.float32), "b": rng.integers(0, 9, 3)},
              int(rng.integers(1, 50)))
             for _ in range(20)]
    acc = Accumulator()
    for weights, samples in items:
        acc.add(weights, samples)
    batch, stream = weighted_average(items), acc.result()
    assert acc.count == 20 and acc.total_samples == sum(s for _, s in items)
    assert all(batch[k].tobytes() == stream[k].tobytes() for k in batch)


def test_inputs_are_not_modified() -> None:
    first = {"w": np.array([1.0, 2.0], np.float32), "n": np.array([3], np.int64)}
    weighted_average([(first, 1), ({"w": np.array([5.0, 6.0], np.float32), "n": np.array([9], np.int64)}, 1)])
    assert first["w"].tolist() == [1.0, 2.0] and first["n"].tolist() == [3]


def test_empty_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="no results"):
        weighted_average([])


def test_zero_total_samples_is_an_error() -> None:
    with pytest.raises(ValueError, match="zero samples"):
        weighted_average([({"w": np.zeros(2, np.float32)}, 0)])


def test_mismatched_names_are_an_error() -> None:
    with pytest.raises(ValueError, match="different tensor names"):
        weighted_average([({"w": np.zeros(2, np.float32)}, 1), ({"v": np.zeros(2, np.float32)}, 1)])


def test_mismatched_shapes_are_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        weighted_average([({"w": np.zeros(2, np.float32)}, 1), ({"w": np.zeros(3, np.float32)}, 1)])


def test_negative_samples_are_an_error() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        Accumulator().add({"w": np.zeros(2, np.float32)}, -1)
