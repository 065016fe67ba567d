"""Named tensors as bytes: the model hash, and the one weight format used on disk, in the database and on the wire.

Weights are plain ``dict[str, numpy.ndarray]`` here so the ledger needs no deep-learning framework.
The blob format is ``MAGIC | u32 header length | canonical JSON header | raw little-endian C-order data``;
it is never pickled and every field is checked on decode.
"""
from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping

import numpy as np

from chain.encoding import EncodingError, canonical_bytes, parse_canonical

MAGIC = b"FLTENS1\n"
MODEL_HASH_DOMAIN = b"fledger/model/v1\n"
# dtype name -> numpy dtype; names are what the hash and the blob header carry.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool")
}
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_NDIM = 16
MAX_DIM = 2**63 - 1   # one shape entry; numpy's sizes are signed 64-bit

Weights = Mapping[str, np.ndarray]


class TensorFormatError(EncodingError):
    """A weight blob or tensor is malformed."""


def dtype_name(array: np.ndarray) -> str:
    name = array.dtype.name
    if name not in DTYPES:
        raise TensorFormatError(f"unsupported dtype {name!r}; supported: {', '.join(DTYPES)}")
    return name


def _raw(array: np.ndarray) -> memoryview:
    little = np.ascontiguousarray(array, dtype=DTYPES[dtype_name(array)])
    # A flat uint8 view, not memoryview.cast: cast refuses arrays with a zero-length dimension.
    return little.reshape(-1).view(np.uint8).data


def model_hash(weights: Weights) -> str:
    """SHA-256 over every tensor's name, dtype, shape and raw bytes, in name order; independent of file format."""
    digest = hashlib.sha256(MODEL_HASH_DOMAIN)
    for name in sorted(weights):
        array = np.asarray(weights[name])
        encoded_name = name.encode("utf-8")
        dname = dtype_name(array).encode("ascii")
        raw = _raw(array)
        digest.update(struct.pack(">I", len(encoded_name)) + encoded_name)
        digest.update(struct.pack(">I", len(dname)) + dname)
        digest.update(struct.pack(">I", array.ndim) + b"".join(struct.pack(">Q", d) for d in array.shape))
        digest.update(struct.pack(">Q", raw.nbytes))
        digest.update(raw)
    return digest.hexdigest()


def encode_weights(weights: Weights) -> bytes:
    """Serialise named tensors into one blob (see module docstring)."""
    entries, parts, offset = [], [], 0
    for name in sorted(weights):
        array = np.asarray(weights[name])
        raw = _raw(array)
        entries.append({"name": name, "dtype": dtype_name(array), "shape": list(array.shape),
                        "offset": offset, "nbytes": raw.nbytes})
        parts.append(raw)
        offset += raw.nbytes
    header = canonical_bytes({"tensors": entries, "total": offset})
    return b"".join([MAGIC, struct.pack(">I", len(header)), header, *parts])


def decode_weights(blob: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Parse a blob from ``encode_weights``; raise TensorFormatError on any inconsistency."""
    view = memoryview(blob).cast("B")
    if view.nbytes < len(MAGIC) + 4 or bytes(view[: len(MAGIC)]) != MAGIC:
        raise TensorFormatError("not a weight blob (bad magic)")
    (header_len,) = struct.unpack(">I", view[len(MAGIC): len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if header_len > MAX_HEADER_BYTES or start + header_len > view.nbytes:
        raise TensorFormatError("weight blob header length is out of range")
    try:
        header = parse_canonical(bytes(view[start: start + header_len]))
    except EncodingError as exc:
        raise TensorFormatError(f"weight blob header: {exc}") from exc
    data = view[start + header_len:]
    if not isinstance(header, dict) or set(header) != {"tensors", "total"} or not isinstance(header["tensors"], list):
        raise TensorFormatError("weight blob header must hold 'tensors' and 'total'")
    if header["total"] != data.nbytes:
        raise TensorFormatError(f"weight blob holds {data.nbytes} data bytes, header says {_brief(header['total'])}")
    out: dict[str, np.ndarray] = {}
    expected_offset = 0
    for entry in header["tensors"]:
        name, array = _decode_entry(entry, data, expected_offset)
        if name in out:
            raise TensorFormatError(f"tensor {_brief(name)} appears twice")
        out[name] = array
        expected_offset += array.nbytes
    if expected_offset != data.nbytes:
        raise TensorFormatError("weight blob has trailing bytes")
    return out


def _brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: error messages never echo a whole malformed header."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _decode_entry(entry: object, data: memoryview, expected_offset: int) -> tuple[str, np.ndarray]:
    if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape", "offset", "nbytes"}:
        raise TensorFormatError(f"bad tensor entry {_brief(entry)}")
    name, dname, shape = entry["name"], entry["dtype"], entry["shape"]
    if not isinstance(name, str) or not name:
        raise TensorFormatError("tensor name must be a non-empty string")
    if dname not in DTYPES:
        raise TensorFormatError(f"tensor {_brief(name)}: unsupported dtype {_brief(dname)}")
    if (not isinstance(shape, list) or len(shape) > MAX_NDIM
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM for d in shape)):
        raise TensorFormatError(f"tensor {_brief(name)}: bad shape {_brief(shape)}")
    dtype = DTYPES[dname]
    # Python ints: a product of int64 entries would wrap around and let a huge shape pass the size checks.
    nbytes = math.prod(shape) * dtype.itemsize
    if entry["nbytes"] != nbytes or entry["offset"] != expected_offset:
        raise TensorFormatError(f"tensor {_brief(name)}: size or offset does not match its dtype and shape")
    if expected_offset + nbytes > data.nbytes:
        raise TensorFormatError(f"tensor {_brief(name)}: data runs past the end of the blob")
    try:
        flat = np.frombuffer(data[expected_offset: expected_offset + nbytes], dtype=dtype)
        array = flat.reshape(shape).copy()
    except (ValueError, OverflowError) as exc:   # e.g. (2**62, 0): no data, but too big a shape for numpy
        raise TensorFormatError(f"tensor {_brief(name)}: shape {_brief(shape)} is not usable: {exc}") from exc
    return name, array


def encoded_size(weights: Weights) -> int:
    """``len(encode_weights(weights))`` from the tensors' names, dtypes and shapes alone (no data is copied)."""
    entries, offset = [], 0
    for name in sorted(weights):
        array = np.asarray(weights[name])
        nbytes = array.size * DTYPES[dtype_name(array)].itemsize
        entries.append({"name": name, "dtype": dtype_name(array), "shape": list(array.shape),
                        "offset": offset, "nbytes": nbytes})
        offset += nbytes
    return len(MAGIC) + 4 + len(canonical_bytes({"tensors": entries, "total": offset})) + offset


def split_chunks(blob: bytes, chunk_size: int) -> list[bytes]:
    """Cut a blob into pieces of at most chunk_size bytes (at least one piece, possibly empty)."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [blob[i: i + chunk_size] for i in range(0, len(blob), chunk_size)] or [b""]
