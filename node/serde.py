"""The one place proto messages become domain objects and back; wire input is checked as it is converted."""
from __future__ import annotations

import math
from collections.abc import Mapping

from chain.block import Cosignature, MalformedError, SignedBlock, SignedRecord
from chain.encoding import EncodingError
from fl.participant import EvalRes, FitIns
from node.errors import BadRequestError
from proto.fledger_pb2 import Cosignature as CosignatureMsg
from proto.fledger_pb2 import EvalReply as EvalReplyMsg
from proto.fledger_pb2 import FitIns as FitInsMsg
from proto.fledger_pb2 import SignedBlock as SignedBlockMsg
from proto.fledger_pb2 import SignedRecord as SignedRecordMsg


def record_to_msg(record: SignedRecord) -> SignedRecordMsg:
    return SignedRecordMsg(record_bytes=record.record_bytes, signature=record.signature)


def record_from_msg(msg: SignedRecordMsg) -> SignedRecord:
    """A SignedRecord whose signature and id have been checked; BadRequestError otherwise."""
    record = SignedRecord(bytes(msg.record_bytes), bytes(msg.signature))
    try:
        record.check()
    except (MalformedError, EncodingError) as exc:
        raise BadRequestError(f"bad update record: {exc}") from exc
    return record


def block_to_msg(block: SignedBlock) -> SignedBlockMsg:
    return SignedBlockMsg(header_bytes=block.header_bytes, signature=block.signature)


def block_from_msg(msg: SignedBlockMsg) -> SignedBlock:
    """A SignedBlock whose proposer signature and id have been checked; BadRequestError otherwise."""
    block = SignedBlock(bytes(msg.header_bytes), bytes(msg.signature))
    try:
        block.check()
    except (MalformedError, EncodingError) as exc:
        raise BadRequestError(f"bad block: {exc}") from exc
    return block


def cosig_to_msg(cosig: Cosignature) -> CosignatureMsg:
    return CosignatureMsg(signer_key=cosig.signer_key, signature=cosig.signature)


def cosig_from_msg(msg: CosignatureMsg) -> Cosignature:
    """Structural conversion only; validity depends on the block, see ``Cosignature.valid_for``."""
    return Cosignature(msg.signer_key, bytes(msg.signature))


def fit_ins_to_msg(ins: FitIns) -> FitInsMsg:
    return FitInsMsg(round=ins.round, epochs=ins.epochs, batch_size=ins.batch_size, lr=ins.lr,
                     momentum=ins.momentum, seed=ins.seed)


def fit_ins_from_msg(msg: FitInsMsg) -> FitIns:
    """FitIns with sane values; BadRequestError naming the bad field otherwise."""
    if msg.epochs < 1 or msg.batch_size < 1:
        raise BadRequestError(f"fit instructions need epochs >= 1 and batch_size >= 1, got {msg.epochs}, {msg.batch_size}")
    if not (math.isfinite(msg.lr) and msg.lr > 0) or not (math.isfinite(msg.momentum) and msg.momentum >= 0):
        raise BadRequestError(f"fit instructions need lr > 0 and momentum >= 0, got {msg.lr}, {msg.momentum}")
    return FitIns(round=msg.round, epochs=msg.epochs, batch_size=msg.batch_size, lr=msg.lr,
                  momentum=msg.momentum, seed=msg.seed)


def metrics_to_msg(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics for a ``map<string, double>`` field (finite floats only)."""
    return {str(k): float(v) for k, v in metrics.items()}


def metrics_from_msg(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {str(k): float(v) for k, v in metrics.items()}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise BadRequestError(f"metrics {bad} are not finite numbers")
    return out


def eval_to_msg(res: EvalRes) -> EvalReplyMsg:
    return EvalReplyMsg(loss=res.loss, accuracy=res.accuracy, samples=res.samples)


def eval_from_msg(msg: EvalReplyMsg) -> EvalRes:
    return EvalRes(loss=msg.loss, accuracy=msg.accuracy, samples=msg.samples)
