"""Round trips of every proto <-> domain conversion, and refusal of tampered wire input."""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from chain.block import Cosignature, SignedBlock, SignedRecord, UpdateRecord, build_header
from chain.keys import NodeKey
from chain.tensors import encode_weights, model_hash
from fl.participant import EvalRes, FitIns
from node.engine.errors import BadRequestError
from node.engine.membership import Member
from node.engine.types import Announcement, BlockData, ChainHead, EdgeRef, Note, Partial, Plan, RoundReport
from node.engine.views import EdgeEval, EvalReport, MemberView, NodeStatus
from node.rpc import serde
from node.rpc.clients import RoundLine
from node.rpc.transport import blob_chunks
from proto.fledger_pb2 import BlockPart as BlockPartMsg
from proto.fledger_pb2 import FitIns as FitInsMsg
from proto.fledger_pb2 import PartialPart as PartialPartMsg

KEY = NodeKey.from_seed(b"serde")
OTHER = NodeKey.from_seed(b"serde-other")
HASH = "ab" * 32
E0, E1, E2 = (f"{i:032x}" for i in range(3))   # edge node ids (any 32 lowercase hex digits)
WEIGHTS: dict[str, np.ndarray] = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "n": np.array([3], np.int64)}


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


def test_metrics_round_trip() -> None:
    metrics = {"loss": 0.25, "accuracy": 0.875, "round_s": 3.0}

    assert serde.metrics_from_msg(serde.metrics_to_msg(metrics)) == metrics


def test_metrics_to_msg_leaves_out_non_finite_values() -> None:
    assert serde.metrics_to_msg({"loss": float("inf"), "accuracy": 0.5}) == {"accuracy": 0.5}


# ---------------------------------------------------------------- announcements


def announcement(**plan_fields: Any) -> Announcement:
    plan = dataclasses.replace(Plan("fedper", lr=0.05, local_epochs=2, batch_size=16, momentum=0.9, seed=7),
                               **plan_fields)
    return Announcement(round=4, base_height=3, base_model_hash=HASH, proposer_id=KEY.node_id,
                        participants=(E2, E0, E1), plan=plan)


def test_announcement_round_trip() -> None:
    ann = announcement()

    assert serde.announcement_from_msg(serde.announcement_to_msg(ann)) == ann


def test_announcement_with_unknown_algorithm_is_bad_request() -> None:
    msg = serde.announcement_to_msg(announcement(algorithm="fedprox"))

    with pytest.raises(BadRequestError, match="unknown algorithm 'fedprox'"):
        serde.announcement_from_msg(msg)


@pytest.mark.parametrize("lr", [0.0, -0.1, float("nan"), float("inf")])
def test_announcement_with_bad_lr_is_bad_request(lr: float) -> None:
    msg = serde.announcement_to_msg(announcement(lr=lr))

    with pytest.raises(BadRequestError, match=r"lr in \(0, 10\]"):
        serde.announcement_from_msg(msg)


def test_announcement_with_zero_epochs_is_bad_request() -> None:
    msg = serde.announcement_to_msg(announcement(local_epochs=0))

    with pytest.raises(BadRequestError, match="epochs in 1..100"):
        serde.announcement_from_msg(msg)


def test_announcement_listing_a_participant_twice_is_bad_request() -> None:
    msg = serde.announcement_to_msg(announcement())
    msg.participants.append(E0)

    with pytest.raises(BadRequestError, match="twice"):
        serde.announcement_from_msg(msg)


# ---------------------------------------------------------------- partials


def same_weights(a: dict[str, np.ndarray] | None, b: dict[str, np.ndarray] | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def partial(weights: dict[str, np.ndarray] | None = WEIGHTS) -> Partial:
    return Partial(sn_id=KEY.node_id, round=4, samples=10 if weights is not None else 0, weights=weights,
                   records=[record()], failures=[(E1, "timeout"), (E2, "rejected: bad receipt")],
                   metrics={"train_loss": 0.5, "train_accuracy": 0.75}, timings={"aggregate": 0.125})


def fields_without_weights(p: Partial) -> tuple[object, ...]:
    return p.sn_id, p.round, p.samples, p.records, p.failures, p.metrics, p.timings


def test_partial_round_trip() -> None:
    sent = partial()

    back = serde.read_partial(serde.partial_parts(sent))

    assert fields_without_weights(back) == fields_without_weights(sent) and same_weights(back.weights, sent.weights)


def test_partial_without_weights_round_trip() -> None:
    sent = partial(weights=None)

    back = serde.read_partial(serde.partial_parts(sent))

    assert fields_without_weights(back) == fields_without_weights(sent) and back.weights is None


def test_partial_not_starting_with_its_header_is_bad_request() -> None:
    parts = list(serde.partial_parts(partial()))

    with pytest.raises(BadRequestError, match="start with its header"):
        serde.read_partial(parts[1:])


def test_partial_with_a_second_header_is_bad_request() -> None:
    parts = list(serde.partial_parts(partial()))

    with pytest.raises(BadRequestError, match="unexpected 'header'"):
        serde.read_partial(parts + [parts[0]])


def test_partial_whose_weights_do_not_hash_as_announced_is_bad_request() -> None:
    header = next(serde.partial_parts(partial()))
    chunks = [PartialPartMsg(weights=c) for c in blob_chunks(encode_weights(WEIGHTS), HASH)]

    with pytest.raises(BadRequestError, match="hash mismatch"):
        serde.read_partial([header, *chunks])


# ---------------------------------------------------------------- block streams


def block_data(prev: BlockData | None = None, weights: dict[str, np.ndarray] = WEIGHTS) -> BlockData:
    prev_block = None if prev is None else prev.block
    header = build_header(prev=None if prev_block is None else prev_block.header,
                          prev_hash=None if prev_block is None else prev_block.hash, timestamp_ms=0,
                          round=0 if prev_block is None else prev_block.header.round + 1, algorithm="fedavg",
                          params={}, model_hash=model_hash(weights), records=[record()], metrics={}, proposer=KEY)
    signed = SignedBlock.create(header, KEY)
    cosigs = tuple(Cosignature.create(header.height, signed.hash, k) for k in (KEY, OTHER))
    return BlockData(signed, (record(),), encode_weights(weights), cosigs)


def test_block_stream_round_trip() -> None:
    first = block_data()
    second = block_data(prev=first, weights={"w": WEIGHTS["w"] + 1, "n": WEIGHTS["n"]})

    back = list(serde.read_blocks([*serde.block_parts(first), *serde.block_parts(second)]))

    assert back == [first, second]


def test_block_stream_whose_weights_are_not_the_blocks_model_is_bad_request() -> None:
    data = block_data()
    other = {"w": WEIGHTS["w"] + 1, "n": WEIGHTS["n"]}
    parts = [BlockPartMsg(block=serde.block_to_msg(data.block)),
             *(BlockPartMsg(weights=c) for c in blob_chunks(encode_weights(other), model_hash(other)))]

    with pytest.raises(BadRequestError, match="not the block's model"):
        list(serde.read_blocks(parts))


def test_block_stream_not_starting_with_a_block_is_bad_request() -> None:
    parts = list(serde.block_parts(block_data()))

    with pytest.raises(BadRequestError, match="must start with a block"):
        list(serde.read_blocks(parts[1:]))


def test_empty_block_stream_message_is_bad_request() -> None:
    parts = list(serde.block_parts(block_data()))

    with pytest.raises(BadRequestError, match="empty block stream message"):
        list(serde.read_blocks([parts[0], BlockPartMsg()]))


# ---------------------------------------------------------------- heads, members, views, status


@pytest.mark.parametrize("head", [None, ChainHead(height=0, hash="cd" * 32, model_hash=HASH),
                                  ChainHead(height=5, hash="cd" * 32, model_hash=HASH)])
def test_head_round_trip(head: ChainHead | None) -> None:
    assert serde.head_from_msg(serde.head_to_msg(head)) == head


@pytest.mark.parametrize("share", [None, 0, 3])
def test_member_round_trips_into_a_view(share: int | None) -> None:
    member = Member(KEY.node_id, KEY.public_hex, "127.0.0.1:5000", capacity=4, samples=600, load=2, share=share)

    view = serde.view_from_msg(serde.member_to_msg(member, alive=False, silent_s=7.5, role="edge", parent_id="sn1"))

    assert view == MemberView(KEY.node_id, KEY.public_hex, "127.0.0.1:5000", "edge", False, 7.5, "sn1", 2, 4, 600,
                              share)


def test_member_to_msg_clamps_a_negative_silence_to_zero() -> None:
    member = Member(KEY.node_id, KEY.public_hex, "127.0.0.1:5000")

    assert serde.member_to_msg(member, silent_s=-0.5).silent_s == 0.0


@pytest.mark.parametrize("share", [None, 0, 3])
def test_view_round_trip(share: int | None) -> None:
    view = MemberView(KEY.node_id, KEY.public_hex, "127.0.0.1:5000", "supernode", True, 1.5, "", 3, 8, 0, share)

    assert serde.view_from_msg(serde.view_to_msg(view)) == view


@pytest.mark.parametrize("share", [None, 0, 3])
def test_member_round_trips_into_an_edge_ref(share: int | None) -> None:
    member = Member(KEY.node_id, KEY.public_hex, "127.0.0.1:5000", samples=600, share=share)

    assert serde.edge_ref_from_msg(serde.member_to_msg(member)) == EdgeRef(KEY.node_id, "127.0.0.1:5000", share, 600)


@pytest.mark.parametrize("head", [None, ChainHead(height=2, hash="cd" * 32, model_hash=HASH)])
def test_status_round_trip(head: ChainHead | None) -> None:
    status = NodeStatus(node_id=KEY.node_id, role="entry", head=head, edges=3, supernodes=2, training=True,
                        paused=True, round=7)

    assert serde.status_from_msg(serde.status_to_msg(status)) == status


# ---------------------------------------------------------------- training progress and evaluation


def test_progress_of_a_finished_round_carries_its_block_and_numbers() -> None:
    data = block_data()
    report = RoundReport(round=1, block=data.block, metrics={"accuracy": 0.5}, participants=3,
                         failures=[("e" * 20, "timeout"), ("f" * 20, "rejected")], timings={"round_s": 2.5})

    msg = serde.progress_to_msg(report)

    assert (msg.round, msg.height, msg.block_hash, msg.participants, msg.failures) == \
        (1, data.block.header.height, data.block.hash, 3, 2)
    assert dict(msg.metrics) == {"accuracy": 0.5} and dict(msg.timings) == {"round_s": 2.5}
    assert msg.message == "eeeeeeeeeeee: timeout; ffffffffffff: rejected"


def test_progress_of_a_note_carries_only_its_message() -> None:
    msg = serde.progress_to_msg(Note(round=4, message="paused"))

    assert (msg.round, msg.message, msg.block_hash, msg.height, msg.participants) == (4, "paused", "", 0, 0)


def test_eval_report_round_trip() -> None:
    report = EvalReport(loss=0.5, accuracy=0.75, samples=100,
                        edges=[EdgeEval("e0", 0.25, 0.875, 20), EdgeEval("e1", error="UNAVAILABLE: gone")],
                        edge_accuracy_mean=0.875, edge_accuracy_min=0.875, edge_accuracy_max=0.875)

    assert serde.eval_report_from_msg(serde.eval_report_to_msg(report)) == report


def test_progress_excluded_updates_reach_the_console_line() -> None:
    data = block_data()
    excluded = [("e" * 32, "update norm 41.2 exceeds --max-update-norm 10"), ("f" * 32, "left out by multi-krum")]
    report = RoundReport(round=2, block=data.block, metrics={}, participants=4, failures=list(excluded),
                         excluded=excluded)

    line = RoundLine.from_msg(serde.progress_to_msg(report))

    assert (line.excluded, "excluded: eeeeeeeeeeee, ffffffffffff" in line.text()) == (excluded, True)


def test_progress_lists_at_most_64_excluded_updates_with_clipped_reasons() -> None:
    data = block_data()
    report = RoundReport(round=2, block=data.block, metrics={}, participants=100, failures=[],
                         excluded=[(f"{i:032x}", "x" * 1000) for i in range(100)])

    line = RoundLine.from_msg(serde.progress_to_msg(report))

    assert (len(line.excluded), max(len(why) for _, why in line.excluded) < 1000) == (64, True)
