"""The edge node (EN): trains on its private data share behind the EdgeNode service and signs each update."""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from chain.keys import NodeKey
from chain.tensors import decode_weights, encode_weights, model_hash
from config import Config
from fl.data import load_dataset
from fl.participant import InProcessParticipant, Participant, Workbench
from fl.weights import state_to_numpy
from node import serde, transport
from node.errors import BadRequestError
from node.options import DEADLINES
from node.rounds import sign_update
from node.setup import client_shares, initial_model, strategy_for
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import FitReply as FitReplyMsg
from proto.fledger_pb2 import FitSummary as FitSummaryMsg
from proto.fledger_pb2 import HeartbeatRequest as HeartbeatRequestMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg

log = logging.getLogger(__name__)

SERVICE = "fledger.v1.EdgeNode"


class EdgeServicer(fledger_pb2_grpc.EdgeNodeServicer):
    """Thin: reassemble weights, call the participant, sign, stream back."""

    def __init__(self, participant: Participant, key: NodeKey, address: str, samples: int = 0,
                 partition_index: int | None = None, personal_file: Path | None = None):
        self.participant = participant
        self.personal_file = personal_file       # where a FedPer EN keeps its personal layers across restarts
        self.key = key
        self.address = address
        self.samples = samples
        self.partition_index = partition_index   # the EN's data share; its SN uses it as the client index

    @transport.guarded_stream
    def Fit(self, request_iterator, context) -> Iterator[FitReplyMsg]:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "ins":
            raise BadRequestError("a Fit stream must start with the FitIns message")
        ins = serde.fit_ins_from_msg(first.ins)
        weights, _ = transport.receive_weights(_weights_only(request_iterator))
        started = time.perf_counter()
        try:
            res = self.participant.fit(weights, ins)
        except ValueError as exc:  # weights that do not fit this EN's model
            raise BadRequestError(f"cannot train on these weights: {exc}") from exc
        train_s = time.perf_counter() - started
        if self.personal_file is not None:
            save_personal(self.participant, self.personal_file)
        record = sign_update(self.key, ins.round, model_hash(weights), res)
        log.info("round %d: trained on %d samples (%s)", ins.round, res.samples,
                 ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items()))
        yield FitReplyMsg(summary=FitSummaryMsg(samples=res.samples, metrics=serde.metrics_to_msg(res.metrics),
                                                record=serde.record_to_msg(record), train_s=train_s))
        for chunk in transport.send_weights(res.weights):
            yield FitReplyMsg(weights=chunk)

    @transport.guarded
    def Evaluate(self, request_iterator, context):
        weights, _ = transport.receive_weights(request_iterator)
        try:
            return serde.eval_to_msg(self.participant.evaluate(weights))
        except ValueError as exc:
            raise BadRequestError(f"cannot evaluate these weights: {exc}") from exc

    def Info(self, request, context) -> NodeInfoMsg:
        return self.node_info()

    def node_info(self) -> NodeInfoMsg:
        return NodeInfoMsg(node_id=self.key.node_id, public_key=self.key.public_hex, address=self.address,
                           samples=self.samples, partition_index=self.partition_index)


def _weights_only(requests) -> Iterator:
    for request in requests:
        if request.WhichOneof("part") != "weights":
            raise BadRequestError("after FitIns a Fit stream may only carry weights chunks")
        yield request.weights


@dataclass(frozen=True)
class DataShare:
    """Which slice of which dataset this EN trains on (the same recipe the simulator uses)."""

    dataset: str = "mnist"
    data_dir: str | None = None
    scheme: str = "iid"
    index: int = 0
    count: int = 1
    seed: int = 0
    model: str = "auto"
    algorithm: str = "fedavg"
    test_fraction: float = 0.2
    alpha: float = 0.5
    shards_per_client: int = 2


def edge_participants(cfg: Config, participant_ids: list[str], device: str = "cpu") -> list[InProcessParticipant]:
    """Shares ``cfg.partition_index`` .. ``+len(participant_ids)-1`` of ``cfg.partition_count``: the data and
    initial model the simulator gives those clients (node.setup's client_shares, initial_model and strategy_for,
    all seeded by ``cfg.seed``). They share one dataset in memory and train in turn on one model."""
    first, count = cfg.partition_index, cfg.partition_count
    if not 0 <= first or first + len(participant_ids) > count:
        raise ValueError(f"data shares {first}..{first + len(participant_ids) - 1} are outside 0..{count - 1}")
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    shares = client_shares(cfg, dataset, count)
    model = initial_model(cfg, dataset)
    shared = strategy_for(cfg).shared_keys(model)
    state = state_to_numpy(model)
    personal = {k: state[k] for k in state if k not in set(shared)} or None
    bench = Workbench(model, device)
    return [InProcessParticipant(pid, dataset, *shares[first + i], bench, shared, personal)
            for i, pid in enumerate(participant_ids)]


def edge_participant(cfg: Config, participant_id: str, device: str = "cpu") -> InProcessParticipant:
    """The one participant of share ``cfg.partition_index`` (see ``edge_participants``)."""
    return edge_participants(cfg, [participant_id], device)[0]


# ---------------------------------------------------------------- FedPer: personal layers survive a restart

PERSONAL_FILE = "personal.weights"


def save_personal(participant: Participant, path: Path) -> None:
    """Write the participant's personal layers (encode_weights format, never pickled) atomically."""
    state = getattr(participant, "personal_state", lambda: None)()
    if state is None:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(encode_weights(state))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def restore_personal(participant: InProcessParticipant, path: Path) -> bool:
    """Load personal layers saved by a previous run of this EN; False when there are none to load.

    A file that does not decode, or whose tensors do not fit the configured model, raises ValueError naming it:
    the EN refuses to start rather than silently train from fresh personal layers.
    """
    if not participant.personal_keys or not path.exists():
        return False
    try:
        state = decode_weights(path.read_bytes())
        current = participant.personal_state() or {}
        wrong = [k for k in state if k in current and (state[k].shape != current[k].shape
                                                      or state[k].dtype != current[k].dtype)]
        if wrong:
            raise ValueError(f"tensor {wrong[0]!r} has another shape or dtype than the model's")
        participant.set_personal_state(state)
    except ValueError as exc:
        raise ValueError(f"personal layers in {path} do not fit this edge node's model ({exc}); "
                         "delete the file to start from fresh personal layers") from exc
    log.info("restored personal layers from %s", path)
    return True


def build_participant(share: DataShare, participant_id: str, device: str = "cpu") -> InProcessParticipant:
    """``edge_participant`` for a DataShare (kept for callers that describe the share field by field)."""
    cfg = Config(dataset=share.dataset, data_dir=share.data_dir, partition=share.scheme, seed=share.seed,
                 model=share.model, algo=share.algorithm, local_test_fraction=share.test_fraction,
                 alpha=share.alpha, shards_per_client=share.shards_per_client, partition_index=share.index,
                 partition_count=share.count)
    return edge_participant(cfg, participant_id, device)


class EdgeNode:
    """An EN process: serves EdgeNode, joins the SN the entry assigns and keeps heartbeating (re-joining if forgotten)."""

    def __init__(self, key: NodeKey, participant: Participant, listen: str, entry: str,
                 advertise_host: str = "127.0.0.1", advertise_port: int | None = None,
                 samples: int = 0, heartbeat_interval: float = 2.0,
                 partition_index: int | None = None, personal_file: Path | None = None):
        self.key = key
        self.entry = entry
        self.heartbeat_interval = heartbeat_interval
        self.server, self.port = transport.create_server(listen, services=[SERVICE])
        self.address = f"{advertise_host}:{advertise_port or self.port}"
        self.servicer = EdgeServicer(participant, key, self.address, samples, partition_index, personal_file)
        fledger_pb2_grpc.add_EdgeNodeServicer_to_server(self.servicer, self.server)
        self.supernode: str | None = None   # address of the SN this EN is registered with
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._membership_loop, name="en-heartbeat", daemon=True)

    def start(self) -> None:
        self.server.start()
        self._thread.start()
        log.info("edge node %s serving on %s; entry %s", self.key.node_id, self.address, self.entry)

    def stop(self, grace: float | None = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.server.stop(grace).wait()

    def join(self) -> str:
        """Ask the entry for an SN, then register there; return the SN address (raises grpc.RpcError)."""
        info = self.servicer.node_info()
        with transport.open_channel(self.entry) as channel:
            assigned = fledger_pb2_grpc.RegistryStub(channel).AssignSuperNode(info, timeout=DEADLINES.register)
        with transport.open_channel(assigned.info.address) as channel:
            reply = fledger_pb2_grpc.SuperNodeStub(channel).RegisterEdge(info, timeout=DEADLINES.register)
        if reply.heartbeat_interval_s > 0:
            self.heartbeat_interval = reply.heartbeat_interval_s
        self.supernode = assigned.info.address
        log.info("joined super node %s at %s", assigned.info.node_id, self.supernode)
        return self.supernode

    def _membership_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.supernode is None:
                    self.join()
                else:
                    self._heartbeat()
            except grpc.RpcError as exc:
                log.warning("membership: %s", transport.rpc_error_text(exc))
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                                  grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.supernode = None   # forgotten or gone: ask the entry again next time
            self._stop.wait(self.heartbeat_interval)

    def _heartbeat(self) -> None:
        with transport.open_channel(str(self.supernode)) as channel:
            fledger_pb2_grpc.SuperNodeStub(channel).EdgeHeartbeat(
                HeartbeatRequestMsg(node_id=self.key.node_id), timeout=DEADLINES.heartbeat)


def fetch_info(address: str) -> NodeInfoMsg:
    """An EN's NodeInfo (raises grpc.RpcError)."""
    with transport.open_channel(address) as channel:
        return fledger_pb2_grpc.EdgeNodeStub(channel).Info(EmptyMsg(), timeout=DEADLINES.query)


class EdgeHost:
    """Several edge nodes in one process (``--hosted-edges``): each its own key, port and membership, all sharing
    one dataset and one model in memory, so dozens fit on a small machine. Starts and stops them together."""

    def __init__(self, nodes: list[EdgeNode]):
        if not nodes:
            raise ValueError("an edge host needs at least one edge node")
        self.nodes = nodes
        self.key = nodes[0].key            # the first node stands for the process (ready file, logs)
        self.address = nodes[0].address
        self.addresses = [n.address for n in nodes]

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def stop(self, grace: float | None = 2.0) -> None:
        for node in self.nodes:
            node.stop(grace)
