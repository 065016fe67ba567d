"""Robust aggregation rules (median, trimmed mean, Multi-Krum, norm clipping) as pure, deterministic numpy functions.

Conventions follow fl.aggregate: floating tensors are computed in float64 and cast back to the base's dtype;
integer and bool tensors (counters such as BatchNorm's ``num_batches_tracked``) take the element-wise maximum over
the updates that were used. Every reduction is an ordered numpy sum or an explicit loop and tensors are combined in
sorted name order (no BLAS), so the same inputs give the same bits on any machine with the same numpy.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fl.aggregate import Weights

RULES = ("fedavg", "median", "trimmed-mean", "multi-krum")

_FORMS = ("choose fedavg, median, trimmed-mean[:beta=B], multi-krum[:f=F,m=M] or clip:norm=C "
          "(clip combines with the others: clip:norm=5+median)")
_KEYS = {"fedavg": (), "median": (), "trimmed-mean": ("beta",), "multi-krum": ("f", "m"), "clip": ("norm",)}
_INT = re.compile(r"[+-]?[0-9]+")
_CHUNK = 1 << 20          # median and trimmed-mean reduce at most this many columns of every update at a time,
_STACK = 1 << 22          # and at most this many float64 values in all (32 MiB: smaller stacks sort faster)
_CACHE_BYTES = 1 << 28    # multi-krum holds one tensor of this many bytes of updates in float64 at a time


@dataclass(frozen=True)
class Rule:
    """An aggregation rule and its parameters; ``spec()`` is its canonical text (it is signed into blocks)."""

    name: str                    # one of RULES
    beta: float = 0.1            # trimmed-mean: share trimmed at each end of every coordinate, 0 <= beta < 0.5
    f: int | None = None         # multi-krum: attackers tolerated; None: max(0, (n - 3) // 2) for n updates
    m: int | None = None         # multi-krum: updates kept; None: n - f
    clip: float | None = None    # L2 bound on each update's distance from the base, applied before the rule (> 0)

    def __post_init__(self) -> None:
        if self.name not in RULES:
            raise ValueError(f"unknown aggregation rule {self.name!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {self.beta!r}")
        if self.name != "trimmed-mean" and self.beta != 0.1:
            raise ValueError(f"beta applies to trimmed-mean only, not {self.name}")
        for key, value, low in (("f", self.f, 0), ("m", self.m, 1)):
            if value is None:
                continue
            if self.name != "multi-krum":
                raise ValueError(f"{key} applies to multi-krum only, not {self.name}")
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if self.clip is not None and (isinstance(self.clip, bool) or not isinstance(self.clip, (int, float))
                                      or not math.isfinite(self.clip) or self.clip <= 0):
            raise ValueError(f"clip norm must be a finite number > 0, got {self.clip!r}")
        object.__setattr__(self, "beta", float(self.beta))
        if self.clip is not None:
            object.__setattr__(self, "clip", float(self.clip))

    def spec(self) -> str:
        """Canonical text: ``clip:norm=C+`` when clipping, the name, then parameters that differ from the defaults."""
        params = []
        if self.name == "trimmed-mean" and self.beta != 0.1:
            params.append(f"beta={_number(self.beta)}")
        if self.f is not None:
            params.append(f"f={self.f}")
        if self.m is not None:
            params.append(f"m={self.m}")
        rule = self.name + (":" + ",".join(params) if params else "")
        if self.clip is None:
            return rule
        clip = f"clip:norm={_number(self.clip)}"
        return clip if rule == "fedavg" else f"{clip}+{rule}"


@dataclass(frozen=True)
class RuleOutcome:
    """What a rule made of a round's updates."""

    weights: Weights     # the aggregate: every tensor of the base, in the base's dtype, C-contiguous
    used: list[bool]     # per input, in input order: whether it went into the aggregate
    notes: list[str]     # per input: why it was not used, or a note on a used one ("" when nothing to say)


def parse_rule(text: str) -> Rule:
    """Parse ``median``, ``trimmed-mean:beta=0.2``, ``clip:norm=5+multi-krum:f=2,m=10``, ...; ValueError if bad."""
    def fail(problem: str) -> ValueError:
        return ValueError(f"{problem} in aggregation rule {text!r}; {_FORMS}")

    rule: tuple[str, dict[str, str]] | None = None
    clip: dict[str, str] | None = None
    for token in text.split("+"):
        name, colon, rest = token.partition(":")
        name = name.strip().lower()
        if not name:
            raise fail("empty rule name")
        if name not in _KEYS:
            raise ValueError(f"unknown aggregation rule {name!r}; {_FORMS}")
        params: dict[str, str] = {}
        for item in rest.split(",") if colon else []:
            key, equals, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if not equals or not key or not value:
                raise fail(f"{name} parameter {item.strip()!r} is not key=value")
            if key not in _KEYS[name]:
                allowed = ", ".join(_KEYS[name]) or "none"
                raise fail(f"unknown parameter {key!r} for {name} (it takes: {allowed})")
            if key in params:
                raise fail(f"{name} parameter {key!r} given twice")
            params[key] = value
        if name == "clip":
            if clip is not None:
                raise fail("clip given twice")
            if "norm" not in params:
                raise fail("clip needs a norm (clip:norm=C)")
            clip = params
        elif rule is not None:
            raise fail(f"two rules joined ({rule[0]} and {name}); only clip combines with a rule")
        else:
            rule = (name, params)
    name, params = rule if rule is not None else ("fedavg", {})
    try:
        beta = _parse_float(params["beta"], "beta") if "beta" in params else 0.1
        f = _parse_int(params["f"], "f") if "f" in params else None
        m = _parse_int(params["m"], "m") if "m" in params else None
        norm = _parse_float(clip["norm"], "clip norm") if clip is not None else None
        return Rule(name, beta=beta, f=f, m=m, clip=norm)
    except ValueError as error:
        raise fail(str(error)) from None


def aggregate(rule: Rule, base: Mapping[str, np.ndarray],
              updates: Sequence[tuple[Mapping[str, np.ndarray], int]]) -> RuleOutcome:
    """Apply ``rule`` to (weights, samples) updates of the model ``base``; the inputs are not modified."""
    inputs = _Inputs(base, updates)
    n = len(updates)
    notes = [""] * n
    if rule.clip is not None:
        inputs.clip(rule.clip, notes)
    used = [True] * n
    if rule.name == "fedavg":
        floats = {name: inputs.weighted_mean(name, range(n)) for name in inputs.floats}
    elif rule.name == "median":
        floats = {name: inputs.coordinatewise(name, _median) for name in inputs.floats}
    elif rule.name == "trimmed-mean":
        k = int(rule.beta * n + 1e-9)
        if n - 2 * k < 1:
            raise ValueError(f"trimmed-mean with beta={_number(rule.beta)} trims {k} from each end of {n} updates, "
                             "leaving none")
        floats = {name: inputs.coordinatewise(name, lambda stack: _trimmed_mean(stack, k)) for name in inputs.floats}
    else:
        selected = _multi_krum(rule, inputs, notes)
        used = [i in selected for i in range(n)]
        floats = {name: inputs.weighted_mean(name, selected) for name in inputs.floats}
    out: Weights = {}
    for name, array in inputs.base.items():
        if name in floats:
            value = floats[name].reshape(array.shape)
        else:
            value = np.array(inputs.updates[used.index(True)][name], copy=True)
            for i in range(n):
                if used[i]:
                    np.maximum(value, inputs.updates[i][name], out=value)
        out[name] = np.array(value, dtype=array.dtype, order="C")
    return RuleOutcome(weights=out, used=used, notes=notes)


class _Inputs:
    """The checked inputs, with each update's float tensors readable (clipped when a clip was applied) in float64."""

    def __init__(self, base: Mapping[str, np.ndarray], updates: Sequence[tuple[Mapping[str, np.ndarray], int]]):
        if not updates:
            raise ValueError("nothing to aggregate: no updates")
        self.base = {name: np.asarray(array) for name, array in base.items()}
        self.floats = sorted(name for name, array in self.base.items() if np.issubdtype(array.dtype, np.floating))
        self.updates: list[dict[str, np.ndarray]] = []
        self.samples: list[int] = []
        for index, (weights, samples) in enumerate(updates):
            if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 0:
                raise ValueError(f"update {index}: samples must be a non-negative integer, got {samples!r}")
            if set(weights) != set(self.base):
                diff = sorted(set(weights) ^ set(self.base))
                raise ValueError(f"update {index} has different tensor names from the base: {diff[:5]}")
            arrays = {name: np.asarray(weights[name]) for name in self.base}
            for name, array in arrays.items():
                if array.shape != self.base[name].shape or array.dtype != self.base[name].dtype:
                    raise ValueError(f"update {index}: tensor {name!r} is {array.dtype}{list(array.shape)}, "
                                     f"the base's is {self.base[name].dtype}{list(self.base[name].shape)}")
            self.updates.append(arrays)
            self.samples.append(int(samples))
        self._flat = {name: self.base[name].ravel() for name in self.floats}
        self._flats = [{name: arrays[name].ravel() for name in self.floats} for arrays in self.updates]
        self._scales: list[float | None] = [None] * len(updates)

    def clip(self, bound: float, notes: list[str]) -> None:
        """Scale each update's float delta from the base down to L2 norm ``bound`` where it is longer."""
        for i in range(len(self.updates)):
            total = 0.0
            for name in self.floats:
                delta = self._flats[i][name].astype(np.float64) - self._flat[name].astype(np.float64)
                total += float(np.sum(np.square(delta)))
            norm = math.sqrt(total)
            scale = min(1.0, bound / norm) if norm > 0 else 1.0
            if scale < 1.0:   # an update within the bound is left exactly as it was
                self._scales[i] = scale
                notes[i] = f"clipped: norm {format(norm, '.3g')} -> {format(bound, '.3g')}"

    def f64(self, i: int, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Update ``i``'s tensor ``name`` (flattened, ``[start:stop]``) in float64, clipped if it was."""
        value = self._flats[i][name][start:stop].astype(np.float64)
        scale = self._scales[i]
        if scale is None:
            return value
        base = self._flat[name][start:stop].astype(np.float64)
        return base + scale * (value - base)

    def weighted_mean(self, name: str, indices: Sequence[int]) -> np.ndarray:
        """Sample-weighted mean of one tensor over ``indices`` in that order (fl.aggregate's arithmetic)."""
        total = sum(self.samples[i] for i in indices)
        if total == 0:
            raise ValueError("cannot weight by samples: every update used reported zero samples")
        acc = np.zeros(self._flat[name].size, dtype=np.float64)
        for i in indices:
            acc += self.f64(i, name) * float(self.samples[i])
        result: np.ndarray = acc / float(total)
        return result

    def coordinatewise(self, name: str, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Reduce an (updates x coordinates) float64 stack column chunk by column chunk."""
        size = self._flat[name].size
        out = np.empty(size, dtype=np.float64)
        chunk = max(1, min(_CHUNK, _STACK // len(self.updates)))
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            stack = np.empty((len(self.updates), stop - start), dtype=np.float64)
            for i in range(len(self.updates)):
                stack[i] = self.f64(i, name, start, stop)
            out[start:stop] = reduce(stack)
        return out


def _trimmed_mean(stack: np.ndarray, k: int) -> np.ndarray:
    n = stack.shape[0]
    stack.sort(axis=0)
    acc = stack[k].copy()
    for row in range(k + 1, n - k):
        acc += stack[row]
    result: np.ndarray = acc / float(n - 2 * k)
    return result


def _multi_krum(rule: Rule, inputs: _Inputs, notes: list[str]) -> list[int]:
    """Indices (in input order) of the ``m`` updates with the lowest Krum scores; notes the others."""
    n = len(inputs.updates)
    f = rule.f if rule.f is not None else max(0, (n - 3) // 2)
    if n < 2 * f + 3:
        raise ValueError(f"multi-krum with f={f} needs at least 2f+3 = {2 * f + 3} updates, got {n}")
    m = rule.m if rule.m is not None else n - f
    if m > n:
        raise ValueError(f"multi-krum keeps m={m} updates but got only {n}")
    distances = [[0.0] * n for _ in range(n)]
    for name in inputs.floats:   # sorted: every pair's distance adds its tensors in the same order
        size = inputs.base[name].size
        block = max(1, _CACHE_BYTES // max(1, size * 8))   # updates held in float64 at once; the others are re-read
        buffer = np.empty(size, dtype=np.float64)
        for start in range(0, n, block):   # the pairs (i, j), i < j, with i in this block
            rows = [inputs.f64(i, name) for i in range(start, min(n, start + block))]
            for j in range(start + 1, n):
                b = rows[j - start] if j < start + len(rows) else inputs.f64(j, name)
                for i in range(start, min(j, start + len(rows))):
                    np.subtract(rows[i - start], b, out=buffer)
                    np.square(buffer, out=buffer)
                    distances[i][j] += float(np.sum(buffer))
            del rows   # before the next block's rows are read
    scores = []
    for i in range(n):
        nearest = sorted(distances[min(i, j)][max(i, j)] for j in range(n) if j != i)[:n - f - 2]
        score = 0.0
        for d in nearest:
            score += d
        scores.append(score)
    order = [int(i) for i in np.argsort(np.array(scores, dtype=np.float64), kind="stable")]
    for rank, i in enumerate(order[m:], start=m + 1):
        reason = f"not selected by multi-krum: score {format(scores[i], '.3g')}, rank {rank} of {n} (keeps {m})"
        notes[i] = reason + (f"; {notes[i]}" if notes[i] else "")
    return sorted(order[:m])


def _number(value: float) -> str:
    """A parameter as spec text: integral values as ints (5.0 -> "5"), others via repr (0.2 -> "0.2").

    Every float from 2**53 up is integral, so repr is only used below that and never writes an 'e+' exponent,
    whose '+' would read as the joiner of two rules.
    """
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def _parse_float(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None


def _parse_int(text: str, what: str) -> int:
    if not _INT.fullmatch(text):
        raise ValueError(f"{what} must be an integer, got {text!r}")
    return int(text)


def _median(stack: np.ndarray) -> np.ndarray:
    """The median of each column, as np.median gives it (the mean of the two middle values for an even count),
    through a full sort along the short axis: about twice as fast as np.median's partition for a few dozen rows."""
    ordered = np.sort(stack, axis=0)
    n = ordered.shape[0]
    middle = ordered[n // 2]
    if n % 2:
        return np.array(middle, copy=True)
    return np.asarray((ordered[n // 2 - 1] + middle) / 2.0)
