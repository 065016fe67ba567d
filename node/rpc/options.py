"""gRPC channel and server options, chunk sizes and per-call deadlines, in one place with the reason for each."""
from __future__ import annotations

from dataclasses import dataclass

# Weights travel as slices of this size. Well under gRPC's 4 MiB default message limit, big enough that a
# 100 MB model is ~100 messages rather than thousands.
CHUNK_SIZE = 1 * 1024 * 1024

# Largest single message we accept or send. A message holds at most one weight chunk (CHUNK_SIZE) or a
# header with signed records; 16 MiB leaves headroom for big record batches while still bounding the memory
# one bad peer can make us allocate per message. Raising CHUNK_SIZE past this would break transfers.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

# Largest reassembled weight blob a receiver will buffer (the first chunk's total_size is checked against it
# before anything is stored), so a lying peer cannot make us allocate unbounded memory. This is the fallback for a
# receiver that does not know the model yet (a syncing node); one that does caps a transfer at the model's own
# encoded size plus TRANSFER_SLACK_BYTES.
MAX_MODEL_BYTES = 1024 * 1024 * 1024
# Room over a known model's encoded size: its blob header grows with the digits of its shapes and offsets.
TRANSFER_SLACK_BYTES = 64 * 1024

# ---- bounds on what a peer may ask or claim (checked by serde as a message is converted)
MAX_LOCAL_EPOCHS = 100          # epochs in one Fit: a round's work must end within its deadline
MAX_BATCH_SIZE = 65536
MAX_LR = 10.0                   # learning rate in (0, MAX_LR]; momentum in [0, 1)
MAX_PARTICIPANTS = 100_000      # edge nodes named by one announcement, records in one partial or block
MAX_COSIGNATURES = 1024         # co-signatures sent with one block
MAX_METRICS = 64                # entries of one metrics or timings map
MAX_METRIC_NAME_CHARS = 64
MAX_REASON_CHARS = 500          # a failure reason is cut to this length

# ---- what one server gives its callers
# A client stream that sends no message for this long is cancelled (DEADLINE_EXCEEDED), freeing its worker: a
# peer that opens streams and goes silent must not hold the server's threads.
STREAM_IDLE_S = 30.0
# Calls in flight from one peer (its TLS identity, else its IP address); more are RESOURCE_EXHAUSTED. Eight is
# well above what one honest node has open at a time on one server (a heartbeat, a round, a block, a sync).
MAX_CALLS_PER_PEER = 8
# Server threads, and the calls a server admits at once (create_server's max_workers and
# maximum_concurrent_rpcs). Calls past MAX_WORKERS wait for a thread; past MAX_CONCURRENT_RPCS gRPC refuses them
# at once with RESOURCE_EXHAUSTED rather than queueing without end.
MAX_WORKERS = 32
MAX_CONCURRENT_RPCS = 64

_COMMON = [
    # Raise the 4 MiB receive default deliberately (see MAX_MESSAGE_BYTES).
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Match it on send so an oversized message fails here with a clear error, not at the peer.
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def channel_options() -> list[tuple[str, int]]:
    """Options for every client channel."""
    return _COMMON + [
        # Ping an idle connection every 30 s so a dead SN/EN is noticed between rounds, not mid-round.
        ("grpc.keepalive_time_ms", 30_000),
        # Declare the connection dead if a ping is not answered within 10 s.
        ("grpc.keepalive_timeout_ms", 10_000),
        # Keep pinging while no call is active (nodes sit idle between rounds).
        ("grpc.keepalive_permit_without_calls", 1),
        # Do not cap pings without data: the server below permits our 30 s cadence.
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, int]]:
    """Options for every server."""
    return _COMMON + [
        # Accept client keepalive pings as often as every 20 s (clients ping every 30 s); the default 5 min
        # minimum would make the server answer our pings with GOAWAY "too_many_pings".
        ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
        # Allow those pings while no call is active, matching the client's permit_without_calls.
        ("grpc.keepalive_permit_without_calls", 1),
        # Do not reuse a port another process still holds (SO_REUSEPORT would let two nodes share one).
        ("grpc.so_reuseport", 0),
    ]


@dataclass(frozen=True)
class Deadlines:
    """Per-call timeouts in seconds; every client call passes one of these as ``timeout=``."""

    register: float = 10.0       # registration and assignment: small unary calls
    heartbeat: float = 5.0       # heartbeats: must fail fast so liveness stays accurate
    query: float = 30.0          # head, status, list, info, single block
    fit: float = 3600.0          # local training of one EN, including both weight transfers
    evaluate: float = 600.0      # evaluation of one model on one EN
    round: float = 7200.0        # announce + partial reply: a whole SN's share of a round
    train: float = 86400.0       # a whole Admin.Train stream (many rounds) or a full-chain Verify
    block: float = 600.0         # propose/commit of a block with its model
    commit: float = 600.0        # commit of a prepared block: the peer only writes what it holds
    sync: float = 3600.0         # fetching a range of blocks with models


DEADLINES = Deadlines()

# What a round's default deadline assumes (``round_deadline``): an edge device this many times slower than a
# desktop core per training sample, and a link this slow for its model transfers.
SLOW_DEVICE_S_PER_SAMPLE = {"2nn": 0.0005, "cnn": 0.005, "cifar-cnn": 0.02}
SLOW_LINK_BYTES_PER_S = 1_000_000
MIN_ROUND_S = 60.0


def round_deadline(model: str, local_epochs: int, samples_per_edge: int, model_bytes: int) -> float:
    """The default bound on one round (``--round-timeout``), from the work it holds: local training of one edge
    node's share on a slow device, the model's four transfers (down and up, edge and super node) on a slow link,
    times three for contention, and never under MIN_ROUND_S."""
    train_s = local_epochs * samples_per_edge * SLOW_DEVICE_S_PER_SAMPLE.get(model, 0.02)
    transfer_s = 4 * model_bytes / SLOW_LINK_BYTES_PER_S
    return max(MIN_ROUND_S, 3 * (train_s + transfer_s))


def deadlines_for(round_s: float) -> Deadlines:
    """Per-call deadlines that follow from a round's bound: a frozen edge node, super node or proposer stalls a
    round at most ``round_s``; a block's co-signing and commit, and queries, get short bounds of their own."""
    block = min(DEADLINES.block, max(15.0, round_s / 4))
    # A commit sends no model: the peer writes the block it prepared. A frozen co-signer holds a round this long.
    commit = max(5.0, round_s / 8)
    return Deadlines(register=DEADLINES.register, heartbeat=DEADLINES.heartbeat, query=min(10.0, round_s),
                     fit=round_s, evaluate=round_s, round=round_s, train=DEADLINES.train, block=block,
                     commit=commit, sync=max(round_s, 120.0))
