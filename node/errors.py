"""Domain errors of the network layer; transport.py maps each to a gRPC status code (no grpc imports here)."""
from __future__ import annotations


class NetError(Exception):
    """Base of errors a peer can cause; the message is sent back to it."""


class BadRequestError(NetError, ValueError):
    """Malformed input: bad chunk sequence, size or hash mismatch, garbage blob, bad signature."""


class UnknownNodeError(NetError, LookupError):
    """A node id that is not (or no longer) registered."""


class TakenIdError(NetError):
    """A node id already registered under a different public key."""


class NoCapacityError(NetError):
    """No live super node has room (or the chosen one is full)."""


class DeadNodeError(NetError):
    """The node exists but is not answering / missed its heartbeats."""


class StaleRoundError(NetError):
    """A round number at or below one already seen, or a block not at the expected height."""


class NoMajorityError(DeadNodeError):
    """A proposed block was co-signed by too few super nodes to be final; nobody stored it."""
