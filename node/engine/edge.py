"""An edge node's side of a round: train on its share, keep its personal layers, sign the update. The gRPC edge
service and the simulator's in-process edge nodes both run exactly this."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from chain.block import SignedRecord
from chain.keys import NodeKey
from chain.private import write_private
from chain.tensors import decode_weights, encode_weights, encoded_size, model_hash
from config import ConfigError
from fl.attacks import Attack
from fl.local import InProcessParticipant
from fl.participant import EvalRes, FitIns, FitRes, Participant
from fl.train import TrainingCancelled
from fl.weights import state_to_numpy
from node.engine.errors import BadRequestError, CancelledError
from node.engine.receipts import sign_update
from node.engine.types import Base, EdgeRef, Weights

log = logging.getLogger(__name__)

PERSONAL_FILE = "personal.weights"


class EdgeCore:
    """One edge node's training: a participant (its data share and model), its key, and where it keeps its
    personal layers (FedPer) across restarts."""

    def __init__(self, participant: InProcessParticipant, key: NodeKey, personal_file: Path | None = None,
                 share: int | None = None, attack: Attack | None = None):
        self.participant = participant
        self.key = key
        self.personal_file = personal_file
        self.share = share
        self.attack = attack   # a malicious edge node: it signs what the attack makes of its honest training
        self.node_id = key.node_id
        self._model_bytes: int | None = None

    @property
    def samples(self) -> int:
        return self.participant.num_train_samples

    @property
    def model_bytes(self) -> int:
        """The encoded size of this edge node's whole model: no model sent to it for training or evaluation is
        larger (the wire layer caps transfers at this plus a little slack for the blob's header). Measured once,
        without the model's lock: only shapes and dtypes count, and training changes neither."""
        if self._model_bytes is None:
            self._model_bytes = encoded_size(state_to_numpy(self.participant.workbench.model))
        return self._model_bytes

    def fit(self, weights: Weights, ins: FitIns, base_hash: str,
            cancel: threading.Event | None = None) -> tuple[FitRes, SignedRecord, str, float]:
        """Train from ``weights`` (whose hash the caller computed once); return the result (its receipt is the
        signed record), the signed record, the update's hash, and the seconds spent training. BadRequestError when
        the weights do not fit this edge node's model; CancelledError when ``cancel`` is set before training ends
        (the caller gave up: training stops between two batches)."""
        started = time.perf_counter()
        try:
            if self.attack is not None:
                participant = self.participant

                def trainer(w: Weights, i: FitIns, label_map: np.ndarray | None) -> FitRes:
                    return participant.fit(w, i, cancel=cancel, label_map=label_map)

                res = self.attack.fit(trainer, weights, ins, participant.num_classes, self.samples)
            elif cancel is not None and isinstance(self.participant, InProcessParticipant):
                res = self.participant.fit(weights, ins, cancel=cancel)
            else:   # a stand-in participant (tests) trains to the end
                res = self.participant.fit(weights, ins)
        except TrainingCancelled as exc:
            log.info("round %d: %s; the caller went away", ins.round, exc)
            raise CancelledError(f"round {ins.round}: {exc}") from exc
        except ValueError as exc:
            raise BadRequestError(f"cannot train on these weights: {exc}") from exc
        train_s = time.perf_counter() - started
        if self.personal_file is not None:
            save_personal(self.participant, self.personal_file)
        update_hash = model_hash(res.weights)
        record = sign_update(self.key, ins.round, base_hash, update_hash, res)
        log.info("round %d: trained on %d samples (%s)", ins.round, res.samples,
                 ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items()))
        return FitRes(res.weights, res.samples, res.metrics, receipt=record), record, update_hash, train_s

    def evaluate(self, weights: Weights) -> EvalRes:
        try:
            return self.participant.evaluate(weights)
        except ValueError as exc:
            raise BadRequestError(f"cannot evaluate these weights: {exc}") from exc


class _InProcessEdge:
    """An EdgeCore as a round's participant, in the same process: no transfer, so the base is not re-hashed."""

    def __init__(self, core: EdgeCore, base: Base, on_fit: Callable[[], None] | None):
        self.core = core
        self.base = base
        self.on_fit = on_fit
        self.participant_id = core.node_id

    def fit(self, weights: dict[str, np.ndarray], ins: FitIns) -> FitRes:
        res, _, _, _ = self.core.fit(weights, ins, self.base.model_hash)
        if self.on_fit is not None:
            self.on_fit()
        return res

    def evaluate(self, weights: dict[str, np.ndarray]) -> EvalRes:
        return self.core.evaluate(weights)


class LocalEdges:
    """A super node's edge nodes living in this process (the simulator): they share one model, so they fit in turn."""

    concurrency = 1

    def __init__(self, cores: list[EdgeCore], on_fit: Callable[[], None] | None = None):
        self.cores = {t.node_id: t for t in cores}
        self.on_fit = on_fit   # called after each fit (the simulator's progress bar)
        self._refs = [EdgeRef(t.node_id, "", t.share, t.samples) for t in cores]

    def edges(self) -> list[EdgeRef]:
        return list(self._refs)

    def connect(self, edge: EdgeRef, base: Base) -> Participant:
        return _InProcessEdge(self.cores[edge.node_id], base, self.on_fit)

    def release(self, participant: Participant) -> None:
        pass


def save_personal(participant: InProcessParticipant, path: Path) -> None:
    """Write the participant's personal layers (encode_weights format, never pickled) atomically, mode 0600: they
    are derived from the edge node's private data."""
    state = participant.personal_state()
    if state is None:
        return
    write_private(path, encode_weights(state))


def restore_personal(participant: InProcessParticipant, path: Path) -> bool:
    """Load personal layers saved by a previous run of this edge node; False when there are none to load.

    A file that does not decode, or whose tensors do not fit the configured model, raises ConfigError naming it:
    the edge node refuses to start rather than silently train from fresh personal layers.
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
        raise ConfigError(f"personal layers in {path} do not fit this edge node's model ({exc}); "
                         "delete the file to start from fresh personal layers") from exc
    log.info("restored personal layers from %s", path)
    return True

