"""GrpcParticipant: the fl Participant protocol over the EdgeNode service, so run_round drives remote ENs."""
from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from chain.tensors import model_hash
from fl.participant import EvalRes, FitIns, FitRes
from node import serde, transport
from node.errors import BadRequestError
from node.options import DEADLINES, Deadlines
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import FitRequest as FitRequestMsg

log = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """A remote participant failed or answered something unusable; run_round records it as a failure."""


class GrpcParticipant:
    """One EN seen through gRPC. FitRes.receipt is its checked SignedRecord."""

    def __init__(self, participant_id: str, address: str, deadlines: Deadlines = DEADLINES):
        self.participant_id = participant_id   # the EN's node id; its records must be signed by that id
        self.address = address
        self.deadlines = deadlines
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self.last_fit: tuple[float, float] | None = None   # (Fit call seconds, of which the EN trained), last fit

    @property
    def stub(self) -> fledger_pb2_grpc.EdgeNodeStub:
        with self._lock:
            if self._channel is None:
                self._channel = transport.open_channel(self.address)
            return fledger_pb2_grpc.EdgeNodeStub(self._channel)

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        base_hash = model_hash(weights)

        def requests() -> Iterator[FitRequestMsg]:
            yield FitRequestMsg(ins=serde.fit_ins_to_msg(ins))
            for chunk in transport.send_weights(weights):
                yield FitRequestMsg(weights=chunk)

        started = time.perf_counter()
        try:
            replies = self.stub.Fit(requests(), timeout=self.deadlines.fit)
            first = next(replies, None)
            if first is None or first.WhichOneof("part") != "summary":
                raise RemoteError(f"{self.participant_id}: Fit reply did not start with a summary")
            summary = first.summary
            record = serde.record_from_msg(summary.record)
            metrics = serde.metrics_from_msg(summary.metrics)
            got, _ = transport.receive_weights(r.weights for r in replies if r.WhichOneof("part") == "weights")
        except grpc.RpcError as exc:
            raise RemoteError(f"{self.participant_id} at {self.address}: {transport.rpc_error_text(exc)}") from exc
        except BadRequestError as exc:
            raise RemoteError(f"{self.participant_id} sent a bad answer: {exc}") from exc
        self._check_receipt(record.record, ins, base_hash, got, summary.samples)
        self.last_fit = (time.perf_counter() - started, max(0.0, summary.train_s))
        return FitRes(weights=got, samples=int(summary.samples), metrics=metrics, receipt=record)

    def _check_receipt(self, rec, ins: FitIns, base_hash: str, got: dict[str, np.ndarray], samples: int) -> None:
        problems = []
        if rec.trainer_id != self.participant_id:
            problems.append(f"signed by {rec.trainer_id}")
        if rec.round != ins.round:
            problems.append(f"for round {rec.round}, not {ins.round}")
        if not hmac.compare_digest(rec.base_model_hash, base_hash):
            problems.append("base_model_hash is not the model sent")
        if not hmac.compare_digest(rec.update_hash, model_hash(got)):
            problems.append("update_hash does not match the weights received")
        if rec.samples != samples:
            problems.append(f"samples {rec.samples} differ from the summary's {samples}")
        if problems:
            raise RemoteError(f"{self.participant_id}: update record rejected: {'; '.join(problems)}")

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        try:
            reply = self.stub.Evaluate(transport.send_weights(weights), timeout=self.deadlines.evaluate)
        except grpc.RpcError as exc:
            raise RemoteError(f"{self.participant_id} at {self.address}: {transport.rpc_error_text(exc)}") from exc
        return serde.eval_from_msg(reply)
