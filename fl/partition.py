"""Seeded splits of the training set across clients (IID, McMahan shards, Dirichlet label skew) and per-client
local test splits."""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

SCHEMES = ("iid", "shards", "dirichlet")
_DIRICHLET_REDRAWS = 50  # redraws before the deterministic fix-up moves samples into empty clients


class PartitionError(ValueError):
    """A partition cannot be made with the given arguments."""


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_clients`` disjoint, covering int64 index arrays; same seed, same
    split."""
    labels = np.asarray(labels)
    if num_clients < 1:
        raise PartitionError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > len(labels):
        raise PartitionError(f"{num_clients} clients but only {len(labels)} samples; use fewer clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        # The benchmark baseline (bench/plain_fedavg.py) repeats this exact recipe.
        return [part.astype(np.int64) for part in np.array_split(rng.permutation(len(labels)), num_clients)]
    if scheme == "shards":
        return _shards(labels, num_clients, shards_per_client, rng)
    if scheme == "dirichlet":
        if not alpha > 0:
            raise PartitionError(f"dirichlet alpha must be > 0, got {alpha}")
        return _dirichlet(labels, num_clients, alpha, rng)
    raise PartitionError(f"unknown partition scheme {scheme!r}; choose one of: {', '.join(SCHEMES)}")


def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    """McMahan et al. 2017: sort by label, cut into equal shards, deal ``per_client`` random shards to each client."""
    if per_client < 1:
        raise PartitionError(f"shards_per_client must be at least 1, got {per_client}")
    num_shards = num_clients * per_client
    if num_shards > len(labels):
        raise PartitionError(f"{num_shards} shards but only {len(labels)} samples; use fewer clients or shards")
    shards = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    order = rng.permutation(num_shards)
    return [
        np.concatenate([shards[s] for s in order[c * per_client:(c + 1) * per_client]]).astype(np.int64)
        for c in range(num_clients)
    ]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, client shares ~ Dir(alpha); redraw while a client is empty, then move single samples
    deterministically."""
    classes = np.unique(labels)
    for _ in range(_DIRICHLET_REDRAWS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for client, part in enumerate(np.split(idx, cuts)):
                buckets[client].append(part)
        parts = [np.concatenate(b).astype(np.int64) for b in buckets]
        if all(len(p) for p in parts):
            return parts
    # Fix-up: each empty client takes the last sample of the currently largest client.
    for client in range(num_clients):
        if len(parts[client]) == 0:
            donor = max(range(num_clients), key=lambda k: (len(parts[k]), -k))
            parts[client], parts[donor] = parts[donor][-1:], parts[donor][:-1]
    log.debug("dirichlet alpha=%s needed the empty-client fix-up", alpha)
    return parts


def local_split(indices: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle a client's indices (seeded) and hold out ``test_fraction`` of them; at least one stays for training."""
    indices = np.asarray(indices, dtype=np.int64)
    if not 0.0 <= test_fraction < 1.0:
        raise PartitionError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if len(indices) == 0:
        raise PartitionError("a client with no samples cannot be split")
    n_test = min(int(len(indices) * test_fraction), len(indices) - 1)
    if n_test == 0:  # nothing held out: keep the partition's order, so training matches a plain loop's
        return indices.copy(), indices[:0].copy()
    shuffled = np.random.default_rng(seed).permutation(indices)
    return shuffled[n_test:], shuffled[:n_test]
