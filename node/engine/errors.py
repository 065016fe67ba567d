"""Errors a peer or a caller can cause, each with one meaning; the wire layer maps each to one gRPC status code."""
from __future__ import annotations


def clip(text: object, limit: int = 200) -> str:
    """``text`` made fit for one log line or a status message whatever a peer put in it: characters that are not
    printable (newlines, other control characters) escaped as Python does, and anything past ``limit``
    characters cut off with a note of the full length. The result is at most ``limit`` + 24 characters."""
    full = str(text)
    head = "".join(c if c.isprintable() else repr(c)[1:-1] for c in full[:limit])
    if len(full) <= limit and len(head) <= limit:
        return head
    return f"{head[:limit]}...[{len(full)} chars]"


class NetError(Exception):
    """Base of the errors whose message is sent back to the caller. One that came back from a remote call also
    carries the call's status name (e.g. "UNAVAILABLE") and the peer's own message."""

    status: str = ""
    details: str = ""


class BadRequestError(NetError, ValueError):
    """Malformed or invalid input: bad chunk sequence, size or hash mismatch, garbage blob, bad signature."""


class NotFoundError(NetError, LookupError):
    """No such node (or it was dropped), block height, or pending proposal."""


class TakenIdError(NetError):
    """A node id already registered under a different public key."""


class NoCapacityError(NetError):
    """No live super node has room (or the chosen one is full)."""


class UnavailableError(NetError):
    """The node cannot serve this now: a peer is not answering, or this node's store refused a write."""


class PreconditionError(NetError):
    """Not in the state the request needs: a stale or busy round, a block that does not extend the head."""


class NoMajorityError(NetError):
    """A proposed block was co-signed by too few super nodes to be final; nobody stored it."""


class CancelledError(NetError):
    """The caller cancelled the call (or gave up on it), and the work it asked for was stopped."""


class UnauthenticatedError(NetError):
    """The caller did not prove who it is (secure mode: no usable certificate, or a node removed from the
    network)."""


class ForbiddenError(NetError, PermissionError):
    """The caller is known but its role may not do this, or it claims to be another node."""
