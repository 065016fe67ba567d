"""A small signed file outside the database naming the chain head, so deleting newest blocks is detected."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from chain.encoding import canonical_bytes, is_hex_digest
from chain.keys import NodeKey, verify_signature
from chain.private import write_private


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, malformed or badly signed."""


@dataclass(frozen=True)
class Checkpoint:
    height: int         # head height when written
    hash: str           # head hash when written
    signer_key: str     # public key of the node that wrote it
    signature: bytes    # signature over message()

    @staticmethod
    def message(height: int, block_hash: str) -> bytes:
        return canonical_bytes({"type": "checkpoint", "height": height, "hash": block_hash, "version": 1})

    @classmethod
    def create(cls, height: int, block_hash: str, key: NodeKey) -> Checkpoint:
        return cls(height, block_hash, key.public_hex, key.sign(cls.message(height, block_hash)))

    def valid(self) -> bool:
        return verify_signature(self.signer_key, self.signature, self.message(self.height, self.hash))

    def write(self, path: str | os.PathLike[str]) -> None:
        """Atomically replace the file (write, fsync, rename), mode 0600."""
        body = json.dumps({"height": self.height, "hash": self.hash, "signer_key": self.signer_key,
                           "signature": self.signature.hex()}, sort_keys=True).encode()
        write_private(path, body)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Checkpoint:
        try:
            raw = json.loads(Path(path).read_text())
            checkpoint = cls(int(raw["height"]), str(raw["hash"]), str(raw["signer_key"]),
                             bytes.fromhex(raw["signature"]))
        except FileNotFoundError as exc:
            raise CheckpointError(f"checkpoint file {path} does not exist") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint file {path} is malformed: {exc}") from exc
        if not is_hex_digest(checkpoint.hash) or checkpoint.height < 0:
            raise CheckpointError(f"checkpoint file {path} is malformed")
        return checkpoint
