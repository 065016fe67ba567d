"""Ed25519 node keys: created on first start, kept with 0600 permissions; node ids derive from public keys."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from chain.private import PRIVATE_FILE, private_dir, tighten

SIGNATURE_BYTES = 64
PUBLIC_KEY_HEX_LEN = 64
NODE_ID_HEX_LEN = 32


class KeyFileError(ValueError):
    """A key file exists but cannot be used."""


def node_id_for(public_key_hex: str) -> str:
    """Self-certifying node id: the first 128 bits of SHA-256 over the raw public key."""
    return hashlib.sha256(bytes.fromhex(public_key_hex)).hexdigest()[:NODE_ID_HEX_LEN]


@dataclass(frozen=True)
class NodeKey:
    """A node's signing key."""

    private: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """A key derived from 32 bytes; for reproducible simulations and tests only."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    def derive(self, label: str) -> NodeKey:
        """A child key fixed by this key and ``label`` (the simulator's clients get their keys this way)."""
        raw = self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        return NodeKey.from_seed(raw + b"/" + label.encode("utf-8"))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> NodeKey:
        """Load the PEM key at ``path``, creating it (mode 0600, parent 0700) when it does not exist."""
        path = Path(path)
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as exc:
                raise KeyFileError(f"{path}: not a PEM private key ({exc}); move it away to create a new one") from exc
            if not isinstance(key, Ed25519PrivateKey):
                raise KeyFileError(f"{path}: not an Ed25519 key")
            tighten(path, PRIVATE_FILE)
            return cls(key)
        if not path.parent.is_dir():
            private_dir(path.parent)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        return cls(key)

    @property
    def public_hex(self) -> str:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                      serialization.PublicFormat.Raw).hex()

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_hex)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def verify_signature(public_key_hex: str, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by that key."""
    if len(signature) != SIGNATURE_BYTES or len(public_key_hex) != PUBLIC_KEY_HEX_LEN:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex)).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True
