"""The edge node (EN): trains on its private data share behind the EdgeNode service and signs each update."""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc

from chain.keys import NodeKey
from chain.tensors import model_hash
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
                 partition_index: int | None = None):
        self.participant = participant
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
        try:
            res = self.participant.fit(weights, ins)
        except ValueError as exc:  # weights that do not fit this EN's model
            raise BadRequestError(f"cannot train on these weights: {exc}") from exc
        record = sign_update(self.key, ins.round, model_hash(weights), res)
        log.info("round %d: trained on %d samples (%s)", ins.round, res.samples,
                 ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items()))
        yield FitReplyMsg(summary=FitSummaryMsg(samples=res.samples, metrics=serde.metrics_to_msg(res.metrics),
                                                record=serde.record_to_msg(record)))
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


def edge_participant(cfg: Config, participant_id: str, device: str = "cpu") -> InProcessParticipant:
    """Share ``cfg.partition_index`` of ``cfg.partition_count``: the data and initial model the simulator gives
    client i of n (node.setup's client_shares, initial_model and strategy_for, all seeded by ``cfg.seed``)."""
    index, count = cfg.partition_index, cfg.partition_count
    if not 0 <= index < count:
        raise ValueError(f"partition index {index} is outside 0..{count - 1}")
    dataset = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    train_idx, test_idx = client_shares(cfg, dataset, count)[index]
    model = initial_model(cfg, dataset)
    shared = strategy_for(cfg).shared_keys(model)
    state = state_to_numpy(model)
    personal = {k: state[k] for k in state if k not in set(shared)} or None
    return InProcessParticipant(participant_id, dataset, train_idx, test_idx, Workbench(model, device), shared,
                                personal)


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
                 advertise_host: str = "127.0.0.1", samples: int = 0, heartbeat_interval: float = 2.0,
                 partition_index: int | None = None):
        self.key = key
        self.entry = entry
        self.heartbeat_interval = heartbeat_interval
        self.server, self.port = transport.create_server(listen, services=[SERVICE])
        self.address = f"{advertise_host}:{self.port}"
        self.servicer = EdgeServicer(participant, key, self.address, samples, partition_index)
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
