"""RFC 6962 / RFC 9162 Merkle tree hash over update records, with inclusion proofs."""
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    k = 1
    while k << 1 < n:
        k <<= 1
    return k


def _root_of_hashes(hashes: Sequence[bytes]) -> bytes:
    if len(hashes) == 1:
        return hashes[0]
    k = _split(len(hashes))
    return node_hash(_root_of_hashes(hashes[:k]), _root_of_hashes(hashes[k:]))


def merkle_root(leaves: Sequence[bytes]) -> str:
    """MTH(D[n]) as hex; the empty tree hashes to SHA-256 of the empty string."""
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    return _root_of_hashes([leaf_hash(leaf) for leaf in leaves]).hex()


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[str]:
    """The audit path PATH(m, D[n]) for leaf ``index``, as hex hashes, leaf side first."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
    hashes = [leaf_hash(leaf) for leaf in leaves]
    path: list[bytes] = []

    def walk(lo: int, hi: int, m: int) -> None:
        if hi - lo == 1:
            return
        k = _split(hi - lo)
        if m < k:
            walk(lo, lo + k, m)
            path.append(_root_of_hashes(hashes[lo + k: hi]))
        else:
            walk(lo + k, hi, m - k)
            path.append(_root_of_hashes(hashes[lo: lo + k]))

    walk(0, len(hashes), index)
    return [h.hex() for h in path]


class InclusionError(ValueError):
    """An inclusion proof does not show the leaf at that index in the tree with that root."""


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[str], root: str) -> None:
    """RFC 9162 section 2.1.3.2: check that ``leaf`` sits at ``index`` in a tree of ``size`` with ``root``.

    Raise InclusionError naming what is wrong.
    """
    if not 0 <= index < size:
        raise InclusionError(f"leaf index {index} is out of range for a tree of {size} leaves")
    fn, sn = index, size - 1
    result = leaf_hash(leaf)
    for hex_hash in proof:
        if sn == 0:
            raise InclusionError(f"proof for leaf {index} of {size} is longer than the tree is deep")
        try:
            sibling = bytes.fromhex(hex_hash)
        except ValueError as exc:
            raise InclusionError(f"proof for leaf {index} of {size} holds a hash that is not hex: {exc}") from exc
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            if not fn & 1:
                while fn & 1 == 0 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            result = node_hash(result, sibling)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise InclusionError(f"proof for leaf {index} of {size} is shorter than the tree is deep")
    if not hmac.compare_digest(result.hex(), root):
        raise InclusionError(f"proof for leaf {index} of {size} leads to {result.hex()}, not to root {root}")
