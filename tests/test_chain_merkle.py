"""RFC 6962 Merkle trees against the Certificate Transparency reference vectors, and inclusion proofs."""
from __future__ import annotations

import hashlib

import pytest

from chain.merkle import InclusionError, inclusion_proof, leaf_hash, merkle_root, verify_inclusion

# The reference leaves of certificate-transparency's merkle_tree_test and the roots of their prefixes.
CT_LEAVES = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                        "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = {
    0: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    1: "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    2: "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    3: "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    5: "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    7: "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    8: "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
}
# Published audit paths from the same suite.
CT_PROOFS = {
    (5, 1): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
    (8, 0): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (3, 2): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
}


def test_leaf_hash_of_empty_leaf_is_the_rfc6962_vector():
    expected = "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert leaf_hash(b"").hex() == expected == hashlib.sha256(b"\x00").hexdigest()


@pytest.mark.parametrize("size", sorted(CT_ROOTS))
def test_merkle_root_matches_certificate_transparency_reference(size):
    assert merkle_root(CT_LEAVES[:size]) == CT_ROOTS[size]


@pytest.mark.parametrize("size,index", sorted(CT_PROOFS))
def test_inclusion_proof_matches_certificate_transparency_reference(size, index):
    assert inclusion_proof(CT_LEAVES[:size], index) == CT_PROOFS[(size, index)]


def _leaves(size: int) -> list[bytes]:
    return [f"leaf-{i}".encode() for i in range(size)]


def _verifies(leaf: bytes, index: int, size: int, proof: list[str], root: str) -> bool:
    """Whether verify_inclusion accepts the proof (it raises InclusionError when it does not)."""
    try:
        verify_inclusion(leaf, index, size, proof, root)
    except InclusionError:
        return False
    return True


@pytest.mark.parametrize("size", range(1, 18))
def test_inclusion_proof_verifies_for_every_leaf(size):
    leaves = _leaves(size)
    root = merkle_root(leaves)
    failures = [i for i in range(size)
                if not _verifies(leaves[i], i, size, inclusion_proof(leaves, i), root)]
    assert failures == []


@pytest.mark.parametrize("size", range(1, 18))
def test_inclusion_proof_fails_for_a_wrong_leaf(size):
    leaves = _leaves(size)
    root = merkle_root(leaves)
    accepted = [i for i in range(size)
                if _verifies(b"not-a-leaf", i, size, inclusion_proof(leaves, i), root)]
    assert accepted == []


@pytest.mark.parametrize("size", range(2, 18))
def test_inclusion_proof_fails_for_a_wrong_index(size):
    leaves = _leaves(size)
    root = merkle_root(leaves)
    accepted = [(i, j) for i in range(size) for j in (i - 1, i + 1, size)
                if _verifies(leaves[i], j, size, inclusion_proof(leaves, i), root)]
    assert accepted == []


@pytest.mark.parametrize("size", range(1, 18))
def test_inclusion_proof_fails_for_a_wrong_root(size):
    leaves = _leaves(size)
    wrong_root = merkle_root(leaves + [b"extra"])
    accepted = [i for i in range(size)
                if _verifies(leaves[i], i, size, inclusion_proof(leaves, i), wrong_root)]
    assert accepted == []


def test_inclusion_proof_refuses_an_index_out_of_range():
    with pytest.raises(IndexError):
        inclusion_proof(_leaves(3), 3)


def test_verify_inclusion_error_names_the_leaf_and_the_root():
    leaves = _leaves(5)
    with pytest.raises(InclusionError, match="leaf 2 of 5 .* not to root"):
        verify_inclusion(b"not-a-leaf", 2, 5, inclusion_proof(leaves, 2), merkle_root(leaves))
