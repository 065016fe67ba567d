"""Weight blobs: a known model hash, round trips for every dtype and odd shape, chunking, and refused garbage."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from chain.tensors import DTYPES, MAGIC, TensorFormatError, decode_weights, encode_weights, model_hash, split_chunks

SMALL = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -1], dtype=np.int8)}
# Computed once and cross-checked with a hand-written hashlib digest over the documented layout.
SMALL_MODEL_HASH = "6370e0eecba0f799e967d556786d70b2f03786c4291e308375b34acaab7e7913"


def test_model_hash_of_fixed_small_dict_is_the_known_digest():
    assert model_hash(SMALL) == SMALL_MODEL_HASH


def test_model_hash_ignores_insertion_order():
    assert model_hash({"b": SMALL["b"], "w": SMALL["w"]}) == SMALL_MODEL_HASH


def test_model_hash_depends_on_shape_not_only_bytes():
    assert model_hash({"w": SMALL["w"].reshape(3, 2), "b": SMALL["b"]}) != SMALL_MODEL_HASH


def test_model_hash_is_the_same_for_big_endian_input():
    assert model_hash({"w": SMALL["w"].astype(">f4"), "b": SMALL["b"]}) == SMALL_MODEL_HASH


def _sample(dtype_name: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype_name == "bool":
        return rng.integers(0, 2, size=(3, 4)).astype(bool)
    if dtype_name.startswith(("int", "uint")):
        info = np.iinfo(dtype_name)
        return rng.integers(info.min, info.max, size=(3, 4), dtype=dtype_name, endpoint=True)
    return rng.standard_normal((3, 4)).astype(dtype_name)


def _assert_same_weights(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert got[name].dtype == np.asarray(array).dtype.newbyteorder("=")
        assert got[name].shape == np.asarray(array).shape
        np.testing.assert_array_equal(got[name], array)


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_encode_decode_round_trips_every_supported_dtype(dtype_name):
    weights = {"t": _sample(dtype_name)}
    _assert_same_weights(decode_weights(encode_weights(weights)), weights)


def test_encode_decode_round_trips_zero_dim_and_empty_tensors():
    weights = {"scalar": np.array(3.5, dtype=np.float64), "empty": np.zeros((0, 5), dtype=np.float32),
               "empty1d": np.zeros((0,), dtype=np.int64), "one": np.ones((1, 1, 1), dtype=np.float16)}
    _assert_same_weights(decode_weights(encode_weights(weights)), weights)


def test_encode_decode_round_trips_an_empty_model():
    assert decode_weights(encode_weights({})) == {}


def test_decoded_weights_hash_to_the_original_model_hash():
    weights = {dtype_name: _sample(dtype_name) for dtype_name in DTYPES}
    assert model_hash(decode_weights(encode_weights(weights))) == model_hash(weights)


def test_encode_weights_refuses_an_unsupported_dtype():
    with pytest.raises(TensorFormatError, match="complex128"):
        encode_weights({"c": np.zeros(2, dtype=np.complex128)})


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 100])
def test_split_chunks_then_join_round_trips(size):
    blob = bytes(range(256)) * (size // 256 + 1)
    blob = blob[:size]
    chunks = split_chunks(blob, 10)
    assert b"".join(chunks) == blob and all(len(c) <= 10 for c in chunks) and len(chunks) == max(1, -(-size // 10))


def test_split_chunks_refuses_a_non_positive_size():
    with pytest.raises(ValueError):
        split_chunks(b"abc", 0)


# ---- garbage in ---------------------------------------------------------------------------------------------------

GOOD_BLOB = encode_weights(SMALL)
HEADER_LEN = struct.unpack(">I", GOOD_BLOB[len(MAGIC): len(MAGIC) + 4])[0]
DATA_START = len(MAGIC) + 4 + HEADER_LEN


def _with_header(header: bytes, data: bytes = b"") -> bytes:
    return MAGIC + struct.pack(">I", len(header)) + header + data


@pytest.mark.parametrize("blob", [
    b"",
    b"FLTENS1",                                   # shorter than the magic
    b"NOTMAGIC" + GOOD_BLOB[8:],                  # wrong magic
    GOOD_BLOB[:DATA_START - 3],                   # header cut short
    GOOD_BLOB[:-1],                               # data cut short by one byte
    GOOD_BLOB + b"\x00",                          # one trailing byte
    MAGIC + struct.pack(">I", 2 ** 31) + b"{}",   # absurd header length
    _with_header(b'{"tensors":[],"total":0,"x":1}'),
    _with_header(b'{"tensors": [], "total": 0}'),  # not canonical
    _with_header(b'{"tensors":[{"dtype":"float32","name":"a","nbytes":8,"offset":0,"shape":[3]}],"total":8}',
                 b"\x00" * 8),                     # nbytes disagrees with shape
    _with_header(b'{"tensors":[{"dtype":"object","name":"a","nbytes":8,"offset":0,"shape":[1]}],"total":8}',
                 b"\x00" * 8),                     # unsupported dtype
    _with_header(b'{"tensors":[{"dtype":"int8","name":"a","nbytes":1,"offset":0,"shape":[1]},'
                 b'{"dtype":"int8","name":"a","nbytes":1,"offset":1,"shape":[1]}],"total":2}', b"\x00\x00"),
    _with_header(b'{"tensors":[{"dtype":"int8","name":"a","nbytes":1,"offset":0,"shape":[-1]}],"total":1}',
                 b"\x00"),                         # negative dimension
], ids=["empty", "short", "bad-magic", "header-cut", "data-cut", "trailing", "huge-header-len", "extra-key",
        "non-canonical", "nbytes-mismatch", "bad-dtype", "duplicate-name", "negative-dim"])
def test_decode_weights_refuses_truncated_or_garbage_blobs(blob):
    with pytest.raises(TensorFormatError):
        decode_weights(blob)


def test_decode_weights_refuses_a_header_with_a_flipped_byte():
    blob = bytearray(GOOD_BLOB)
    blob[len(MAGIC) + 4 + 2] ^= 0xFF
    with pytest.raises(TensorFormatError):
        decode_weights(bytes(blob))
