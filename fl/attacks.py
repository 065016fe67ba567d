"""Malicious edge nodes: what an attacker sends back instead of its honest update, deterministic under the run's
seed. Numpy only; the simulator and the network run exactly this code."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import statistics
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from fl.participant import FitIns, FitRes

ATTACKS = ("label-flip", "sign-flip", "scale", "noise", "nan", "free-ride", "stale", "alie")

# Every parameter an attack takes, with its default.
_DEFAULTS: dict[str, dict[str, float]] = {
    "label-flip": {}, "sign-flip": {"scale": 1.0}, "scale": {"factor": 10.0}, "noise": {"sigma": 0.1},
    "nan": {}, "free-ride": {}, "stale": {}, "alie": {"z": 0.0, "n": 0.0},
}
_CHOICES = ("choose label-flip, sign-flip[:scale=S], scale[:factor=K], noise[:sigma=S], nan, free-ride, stale "
            "or alie[:z=Z,n=N]")
_NOISE_STREAM = 0x6E01    # the noise attack's random stream, beside the client's own seed
_ATTACKER_STREAM = 0xA77A  # which shares attack, beside the run's seed

Weights = dict[str, np.ndarray]
# An honest fit: (weights received, instructions, label_map or None) -> FitRes; label_map[y] is the label trained on.
Trainer = Callable[[Weights, FitIns, np.ndarray | None], FitRes]


@dataclass(frozen=True)
class AttackSpec:
    """An attack and its parameters, as parsed from NAME[:key=value,...]."""

    name: str
    params: tuple[tuple[str, float], ...]   # every parameter of the attack, defaults filled, sorted by key

    def get(self, key: str) -> float:
        return dict(self.params)[key]

    def text(self) -> str:
        """The canonical spelling: "sign-flip:scale=10", or just the name when the attack has no parameters."""
        shown = [(k, v) for k, v in self.params if not (self.name == "alie" and v == 0)]   # alie's 0: computed
        if not shown:
            return self.name
        return f"{self.name}:" + ",".join(f"{k}={_number(v)}" for k, v in shown)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def parse_attack(text: str) -> AttackSpec:
    """Parse "sign-flip", "sign-flip:scale=10", "noise:sigma=0.5", "alie:z=1.5,n=20"; ValueError (one line naming
    the problem and the choices) otherwise."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in _DEFAULTS:
        raise ValueError(f"unknown attack {name!r}; {_CHOICES}")
    params = dict(_DEFAULTS[name])
    given: set[str] = set()
    for item in (p.strip() for p in rest.split(",")) if rest.strip() else ():
        key, eq, raw = (s.strip() for s in item.partition("="))
        if key not in params:
            raise ValueError(f"attack {name!r} has no parameter {key!r}; {_CHOICES}")
        if not eq or key in given:
            raise ValueError(f"attack {name!r}: give {key!r} once, as {key}=NUMBER; {_CHOICES}")
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"attack {name!r}: {key}={raw!r} is not a number; {_CHOICES}") from None
        if not math.isfinite(value):
            raise ValueError(f"attack {name!r}: {key} must be finite, got {raw!r}; {_CHOICES}")
        params[key] = value
        given.add(key)
    problem = None
    if name == "noise" and params["sigma"] <= 0:
        problem = f"sigma must be greater than 0, got {_number(params['sigma'])}"
    elif name == "alie" and params["z"] < 0:
        problem = f"z must be at least 0, got {_number(params['z'])}"
    elif name == "alie" and (params["n"] < 0 or not params["n"].is_integer()):
        problem = f"n must be a whole number, at least 0, got {_number(params['n'])}"
    if problem:
        raise ValueError(f"attack {name!r}: {problem}; {_CHOICES}")
    return AttackSpec(name, tuple(sorted(params.items())))


def choose_attackers(seed: int, clients: int, fraction: float) -> list[int]:
    """Which data shares attack: int(fraction * clients + 0.5) of them, drawn with
    np.random.default_rng([seed, 0xA77A]) without replacement, sorted."""
    count = min(clients, max(0, int(fraction * clients + 0.5)))
    rng = np.random.default_rng([seed, _ATTACKER_STREAM])
    return sorted(int(s) for s in rng.choice(clients, size=count, replace=False))


@dataclass(frozen=True)
class Pool:
    """A coalition's honest updates from one base: per floating tensor their mean and population std (float64), and
    each member's own honest result by share."""

    mean: Weights
    std: Weights
    results: dict[int, FitRes]


class Coalition:
    """Colluding attackers in one process: they pool their honest updates (ALIE)."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise ValueError(f"a coalition needs a network of at least 1 edge node, got {n}")
        self.n = n   # how many edge nodes the network has, as this process knows it
        self.seed = seed   # the run's seed: each member's pooled training is seeded by (seed, round, share)
        self.members: list[tuple[int, Trainer]] = []
        self._lock = threading.Lock()
        self._key: tuple[int, str] | None = None
        self._pool: Pool | None = None

    def join(self, train: Trainer, share: int) -> None:
        """A member: its honest trainer and its data-share index."""
        with self._lock:
            if any(s == share for s, _ in self.members):
                raise ValueError(f"share {share} is already in the coalition")
            self.members.append((share, train))
            self.members.sort(key=lambda m: m[0])
            self._key, self._pool = None, None

    def estimate(self, weights: Mapping[str, np.ndarray], ins: FitIns) -> tuple[Weights, Weights]:
        """Per floating tensor, the mean and population std of every member's honest update from ``weights``."""
        pool = self.pool(weights, ins)
        return pool.mean, pool.std

    def pool(self, weights: Mapping[str, np.ndarray], ins: FitIns) -> Pool:
        """Train every member honestly from ``weights`` (in share order, each with its own seed derived from the
        run's seed, the round and its share) the first time a (round, base) is asked for; later calls get the kept
        result. Only the latest (round, base) is kept."""
        key = (ins.round, _fingerprint(weights))
        with self._lock:
            if self._key == key and self._pool is not None:
                return self._pool
            if not self.members:
                raise ValueError("the coalition has no members to pool honest updates from")
            results: dict[int, FitRes] = {}
            for share, train in self.members:
                # from the run's seed, the round and the member: not from whichever member asked first, so that
                # concurrent fits on an edge host pool the same updates
                seed = int(np.random.SeedSequence([self.seed, ins.round, share]).generate_state(1, dtype=np.uint32)[0])
                results[share] = train(dict(weights), dataclasses.replace(ins, seed=seed), None)
            mean: Weights = {}
            std: Weights = {}
            for name in sorted(weights):
                if not _floating(weights[name]):
                    continue
                stack = np.stack([np.asarray(_tensor(r.weights, name), dtype=np.float64) for r in results.values()])
                mean[name] = stack.mean(axis=0)
                std[name] = stack.std(axis=0)
            self._key, self._pool = key, Pool(mean, std, results)
            return self._pool


class Attack:
    """One malicious edge node's behaviour: given its honest trainer, what it sends back."""

    def __init__(self, spec: AttackSpec, coalition: Coalition | None = None, share: int | None = None):
        if spec.name not in _DEFAULTS:
            raise ValueError(f"unknown attack {spec.name!r}; {_CHOICES}")
        if spec.name == "alie" and coalition is None:
            raise ValueError("the alie attack colludes: it needs a Coalition")
        self.spec = spec
        self.coalition = coalition
        self.share = share   # this attacker's data share: its own honest result in the coalition's pool (ALIE)
        self._lock = threading.Lock()
        self._stale: FitRes | None = None

    def fit(self, train: Trainer, weights: dict[str, np.ndarray], ins: FitIns, num_classes: int,
            samples: int) -> FitRes:
        """The malicious answer to one fit. ``weights`` is the base model received (the shared tensors);
        ``samples`` the edge node's honest training-sample count, which the attacker claims."""
        name = self.spec.name
        if name == "label-flip":
            label_map = (num_classes - 1) - np.arange(num_classes, dtype=np.int64)
            res = train(weights, ins, label_map)
            return _result({k: _tensor(res.weights, k) for k in weights}, samples, res.metrics)
        if name in ("sign-flip", "scale"):
            res = train(weights, ins, None)
            k = -self.spec.get("scale") if name == "sign-flip" else self.spec.get("factor")
            return _result(_tamper(weights, res.weights, lambda b, t: b + k * (t - b)), samples, res.metrics)
        if name == "noise":
            rng = np.random.default_rng([ins.seed, _NOISE_STREAM])
            sigma = self.spec.get("sigma")
            noisy = {}
            for key in sorted(weights):   # one draw per floating tensor, in name order
                base = weights[key]
                noisy[key] = _cast(np.asarray(base, dtype=np.float64) + rng.normal(0.0, sigma, np.shape(base)),
                                   base) if _floating(base) else np.array(base, copy=True)
            return _result({k: noisy[k] for k in weights}, samples, {})
        if name == "nan":
            return _result(_tamper(weights, None, lambda b, t: np.full_like(b, np.nan)), samples, {})
        if name == "free-ride":
            return _result({k: np.array(v, copy=True) for k, v in weights.items()}, samples, {})
        if name == "stale":
            with self._lock:
                if self._stale is None:
                    res = train(weights, ins, None)
                    self._stale = FitRes({k: np.array(_tensor(res.weights, k), copy=True) for k in weights},
                                         samples, dict(res.metrics))
                first = self._stale
            return _result({k: v.copy() for k, v in first.weights.items()}, samples, first.metrics)
        return self._alie(weights, ins, samples)

    def _alie(self, weights: dict[str, np.ndarray], ins: FitIns, samples: int) -> FitRes:
        """Baruch et al. 2019, "A little is enough": every member sends mean - z * std of the coalition's honest
        updates, inside the honest spread, so distance-based defences keep it."""
        assert self.coalition is not None
        pool = self.coalition.pool(weights, ins)
        z = self.spec.get("z") or self.z(self.coalition)
        own = pool.results.get(self.share) if self.share is not None else None
        out = {}
        for key, base in weights.items():
            if _floating(base):
                out[key] = _cast(pool.mean[key] - z * pool.std[key], base)
            else:
                out[key] = np.array(_tensor(own.weights, key) if own is not None else base, copy=True)
        return _result(out, samples, own.metrics if own is not None else {})

    def z(self, coalition: Coalition) -> float:
        """ALIE's z when not given: the most the attackers can shift the mean while s = n // 2 + 1 - f honest
        updates still lie farther out (n edge nodes, f of them attackers)."""
        n = int(self.spec.get("n")) or coalition.n
        f = len(coalition.members)
        s = n // 2 + 1 - f
        return statistics.NormalDist().inv_cdf(min(0.999, max(0.5, (n - s) / n)))


def _floating(array: np.ndarray) -> bool:
    return bool(np.issubdtype(np.asarray(array).dtype, np.floating))


def _tensor(weights: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in weights:
        raise ValueError(f"the honest update lacks tensor {key!r}")
    return weights[key]


def _cast(value: np.ndarray, like: np.ndarray) -> np.ndarray:
    """float64 arithmetic back to the received tensor's dtype and shape."""
    return np.ascontiguousarray(np.asarray(value).astype(np.asarray(like).dtype).reshape(np.shape(like)))


def _tamper(base: Mapping[str, np.ndarray], trained: Mapping[str, np.ndarray] | None,
            change: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Weights:
    """``change(base, trained)`` in float64 on every floating tensor, cast back; the others as trained (or as
    received when there was no training)."""
    out = {}
    for key, b in base.items():
        t = _tensor(trained, key) if trained is not None else b
        if _floating(b):
            out[key] = _cast(change(np.asarray(b, dtype=np.float64), np.asarray(t, dtype=np.float64)), b)
        else:
            out[key] = np.array(t, copy=True)
    return out


def _result(weights: Weights, samples: int, metrics: Mapping[str, float]) -> FitRes:
    return FitRes(weights, samples, {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})


def _fingerprint(weights: Mapping[str, np.ndarray]) -> str:
    """A digest of named tensors (names, dtypes, shapes, bytes), to know a base model again."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        array = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
