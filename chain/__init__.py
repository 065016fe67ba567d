"""The ledger: canonical encoding, hashes, Merkle trees, keys, blocks and verification (no SQL, no gRPC)."""
