"""The one canonical byte encoding that is hashed or signed, and fixed-point helpers that keep floats out of it."""
from __future__ import annotations

import hashlib
import json
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

ZERO_HASH = "0" * 64
# Deepest nesting of lists and objects accepted in canonical JSON. Our own documents nest 4 levels at most; a
# bound keeps a hostile 100,000-deep document from exhausting the recursion limit in the parser or the encoder.
MAX_DEPTH = 32


class EncodingError(ValueError):
    """A value cannot be put into the canonical encoding, or bytes are not in it."""


def _check(value: Any, path: str) -> None:
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        return
    if isinstance(value, float):
        raise EncodingError(f"{path}: floats are not allowed in hashed data (got {value!r})")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check(item, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise EncodingError(f"{path}: keys must be strings (got {key!r})")
            _check(item, f"{path}.{key}")
        return
    raise EncodingError(f"{path}: type {type(value).__name__} is not allowed in hashed data")


def canonical_bytes(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, ASCII only, no floats. The only bytes we hash or sign."""
    _check(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def parse_canonical(data: bytes) -> Any:
    """Decode canonical JSON and insist it is in canonical form (re-encoding gives the same bytes)."""
    try:
        value = json.loads(data.decode("ascii"), parse_float=_reject_float)
    except EncodingError:
        raise
    except RecursionError:
        raise EncodingError(f"JSON nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:   # bad ASCII or JSON, or an integer of more digits than Python converts
        raise EncodingError(f"not canonical JSON: {str(exc)[:200]}") from exc
    if _depth(value) > MAX_DEPTH:
        raise EncodingError(f"JSON nests deeper than {MAX_DEPTH} levels")
    if canonical_bytes(value) != data:
        raise EncodingError("bytes are valid JSON but not in canonical form")
    return value


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_DEPTH:   # one level past the bound is enough to refuse it
            stack.extend((child, level + 1) for child in children)
    return deepest


def _reject_float(text: str) -> Any:
    raise EncodingError(f"floats are not allowed in hashed data (got {text})")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def to_fixed(value: float, scale: int) -> int:
    """A float as an integer count of 1/scale units, rounded half-even (basis points: scale 10_000)."""
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        raise EncodingError(f"cannot encode non-finite value {number!r}")
    return int((Decimal(repr(number)) * scale).to_integral_value(ROUND_HALF_EVEN))


def is_hex_digest(value: object, length: int = 64) -> bool:
    # strip() leaves nothing exactly when every character is lowercase hex (and is far cheaper than a loop).
    return isinstance(value, str) and len(value) == length and not value.strip("0123456789abcdef")
