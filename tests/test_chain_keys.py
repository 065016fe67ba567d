"""Node key files: created 0600, reloaded identical, garbage refused; signatures checked."""
from __future__ import annotations

import os

import pytest

from chain.keys import KeyFileError, NodeKey, node_id_for, verify_signature


def test_key_file_is_created_with_mode_0600(tmp_path):
    NodeKey.load_or_create(tmp_path / "keys" / "node.key")
    assert (tmp_path / "keys" / "node.key").stat().st_mode & 0o777 == 0o600


def test_key_file_reloads_the_same_key(tmp_path):
    created = NodeKey.load_or_create(tmp_path / "node.key")
    assert NodeKey.load_or_create(tmp_path / "node.key").public_hex == created.public_hex


def test_key_file_with_loose_permissions_is_tightened_on_load(tmp_path):
    NodeKey.load_or_create(tmp_path / "node.key")
    os.chmod(tmp_path / "node.key", 0o644)
    NodeKey.load_or_create(tmp_path / "node.key")
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", [b"", b"garbage",
                                     b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_garbage_key_file_gives_key_file_error(tmp_path, content):
    (tmp_path / "node.key").write_bytes(content)
    with pytest.raises(KeyFileError):
        NodeKey.load_or_create(tmp_path / "node.key")


def test_node_id_is_the_first_128_bits_of_sha256_of_the_public_key():
    # SHA-256 of 32 zero bytes is 66687aadf862bd776c8fc18b8e9f8e20089714856ee233b3902a591d0d5f2925.
    assert node_id_for("00" * 32) == "66687aadf862bd776c8fc18b8e9f8e20"


def test_verify_signature_accepts_a_good_signature_and_refuses_a_flipped_bit():
    key = NodeKey.from_seed(b"k")
    signature = bytearray(key.sign(b"message"))
    good = verify_signature(key.public_hex, bytes(signature), b"message")
    signature[10] ^= 1
    assert (good, verify_signature(key.public_hex, bytes(signature), b"message")) == (True, False)


@pytest.mark.parametrize("length", [0, 63, 65])
def test_verify_signature_refuses_a_signature_of_the_wrong_length(length):
    key = NodeKey.from_seed(b"k")
    assert not verify_signature(key.public_hex, key.sign(b"m")[:length].ljust(length, b"\0"), b"m")
