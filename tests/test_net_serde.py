"""Round trips of every proto <-> domain conversion, and refusal of tampered wire input."""
from __future__ import annotations

import pytest

from chain.block import Cosignature, SignedBlock, SignedRecord, UpdateRecord, build_header
from chain.keys import NodeKey
from fl.participant import EvalRes, FitIns
from node.rpc import serde
from node.engine.errors import BadRequestError
from proto.fledger_pb2 import FitIns as FitInsMsg

KEY = NodeKey.from_seed(b"serde")
HASH = "ab" * 32


def record() -> SignedRecord:
    rec = UpdateRecord(round=1, trainer_id=KEY.node_id, trainer_key=KEY.public_hex, base_model_hash=HASH,
                       update_hash="cd" * 32, samples=10, metrics={"accuracy_bp": 9000})
    return SignedRecord.create(rec, KEY)


def block() -> SignedBlock:
    header = build_header(prev=None, prev_hash=None, timestamp_ms=0, round=0, algorithm="fedavg", params={},
                          model_hash=HASH, records=[record()], metrics={}, proposer=KEY)
    return SignedBlock.create(header, KEY)


def test_record_round_trip() -> None:
    assert serde.record_from_msg(serde.record_to_msg(record())) == record()


def test_tampered_record_is_bad_request() -> None:
    msg = serde.record_to_msg(record())
    msg.signature = bytes(64)

    with pytest.raises(BadRequestError, match="bad signature"):
        serde.record_from_msg(msg)


def test_block_round_trip() -> None:
    assert serde.block_from_msg(serde.block_to_msg(block())).hash == block().hash


def test_garbage_block_is_bad_request() -> None:
    msg = serde.block_to_msg(block())
    msg.header_bytes = b"{not json"

    with pytest.raises(BadRequestError, match="bad block"):
        serde.block_from_msg(msg)


def test_cosignature_round_trip() -> None:
    cosig = Cosignature.create(0, block().hash, KEY)

    back = serde.cosig_from_msg(serde.cosig_to_msg(cosig))

    assert back == cosig and back.valid_for(0, block().hash)


def test_fit_ins_round_trip() -> None:
    ins = FitIns(round=3, epochs=2, batch_size=32, lr=0.05, momentum=0.9, seed=7)

    assert serde.fit_ins_from_msg(serde.fit_ins_to_msg(ins)) == ins


def test_fit_ins_with_zero_epochs_is_bad_request() -> None:
    with pytest.raises(BadRequestError, match="epochs"):
        serde.fit_ins_from_msg(FitInsMsg(round=1, epochs=0, batch_size=1, lr=0.1))


def test_non_finite_metrics_are_bad_request() -> None:
    with pytest.raises(BadRequestError, match="not finite"):
        serde.metrics_from_msg({"loss": float("nan")})


def test_eval_round_trip() -> None:
    res = EvalRes(loss=0.5, accuracy=0.25, samples=8)

    assert serde.eval_from_msg(serde.eval_to_msg(res)) == res
