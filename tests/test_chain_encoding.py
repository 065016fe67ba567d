"""Known-value tests for the canonical encoding: exact bytes, refused floats and non-canonical JSON, fixed point."""
from __future__ import annotations

import hashlib

import pytest

from chain.encoding import EncodingError, canonical_bytes, parse_canonical, sha256_hex, to_fixed

NESTED = {"b": [1, {"d": None, "c": True}], "a": "\u00e9", "n": -7}
# Written by hand: keys sorted at every level, no whitespace, non-ASCII escaped.
NESTED_BYTES = b'{"a":"\\u00e9","b":[1,{"c":true,"d":null}],"n":-7}'
NESTED_SHA256 = "8e83954125e94c6c1317c77acff13c16a5b5a83d3d18320c1e7e8e759587437b"


def test_canonical_bytes_of_nested_dict_are_sorted_compact_ascii():
    assert canonical_bytes(NESTED) == NESTED_BYTES


def test_sha256_hex_of_canonical_bytes_is_the_known_digest():
    assert sha256_hex(canonical_bytes(NESTED)) == NESTED_SHA256 == hashlib.sha256(NESTED_BYTES).hexdigest()


def test_canonical_bytes_round_trip_through_parse_canonical():
    assert parse_canonical(NESTED_BYTES) == NESTED


@pytest.mark.parametrize("value", [1.5, {"a": 0.0}, [1, 2.0], {"x": {"y": float("nan")}}])
def test_canonical_bytes_refuses_floats(value):
    with pytest.raises(EncodingError, match="float"):
        canonical_bytes(value)


@pytest.mark.parametrize("value", [{1: "a"}, b"bytes", {"s": {1, 2}}])
def test_canonical_bytes_refuses_non_json_types_and_non_string_keys(value):
    with pytest.raises(EncodingError):
        canonical_bytes(value)


@pytest.mark.parametrize("data", [
    b'{"b":1,"a":2}',          # keys out of order
    b'{"a": 1}',               # whitespace
    b'{"a":1.5}',              # a float
    b'{"a":1e3}',              # exponent notation is a float too
    b'{"a":"\xc3\xa9"}',       # raw UTF-8 instead of \u escapes
    b'{"a":1',                 # not JSON at all
    b'{"a":1,"a":1}',          # duplicate key re-encodes shorter
], ids=["unsorted", "whitespace", "float", "exponent", "non-ascii", "truncated", "duplicate-key"])
def test_parse_canonical_refuses_non_canonical_json(data):
    with pytest.raises(EncodingError):
        parse_canonical(data)


@pytest.mark.parametrize("value,scale,expected", [
    (0.12345, 10_000, 1234),      # exactly half: rounds to even
    (0.12355, 10_000, 1236),      # exactly half: rounds to even (up)
    (0.1, 1_000_000, 100_000),    # no binary-float drift (0.1 * 1e6 is 100000.00000000001 in floats)
    (2.5, 1, 2),
    (-2.5, 1, -2),
    (0.98765, 10_000, 9876),
    (3, 100, 300),
])
def test_to_fixed_rounds_half_even_on_the_decimal_value(value, scale, expected):
    assert to_fixed(value, scale) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_to_fixed_refuses_non_finite_values(value):
    with pytest.raises(EncodingError):
        to_fixed(value, 10_000)
