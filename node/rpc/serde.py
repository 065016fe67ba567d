"""The one place protobuf messages become domain values and back; wire input is checked as it is converted
(BadRequestError naming what is wrong)."""
from __future__ import annotations

import hmac
import math
from collections.abc import Iterable, Iterator, Mapping

from chain.block import Cosignature, SignedBlock, SignedRecord
from chain.encoding import is_hex_digest
from chain.keys import NODE_ID_HEX_LEN, PUBLIC_KEY_HEX_LEN
from chain.tensors import encode_weights
from chain.updates import MAX_REASON_CHARS as MAX_UPDATE_REASON_CHARS
from chain.updates import STATUSES, RecordedUpdate
from fl.participant import EvalRes, FitIns
from fl.robust import parse_rule
from node.engine.errors import BadRequestError, clip
from node.engine.membership import MAX_ADDRESS_CHARS, MAX_SAMPLES, Member, check_address, check_node_id
from node.engine.types import (
    Announcement,
    BlockData,
    ChainHead,
    EdgeRef,
    Partial,
    Plan,
    Progress,
    Promise,
    RoundReport,
    Update,
)
from node.engine.views import EdgeEval, EvalReport, MemberView, NodeStatus
from node.rpc.options import (
    MAX_BATCH_SIZE,
    MAX_COSIGNATURES,
    MAX_LOCAL_EPOCHS,
    MAX_LR,
    MAX_METRIC_NAME_CHARS,
    MAX_METRICS,
    MAX_MODEL_BYTES,
    MAX_PARTICIPANTS,
    MAX_REASON_CHARS,
)
from node.rpc.transport import WeightsAssembler, blob_chunks, send_weights
from node.security.tokens import JoinRequest
from proto.fledger_pb2 import BlockPart as BlockPartMsg
from proto.fledger_pb2 import Cosignature as CosignatureMsg
from proto.fledger_pb2 import EdgeEval as EdgeEvalMsg
from proto.fledger_pb2 import EvalReply as EvalReplyMsg
from proto.fledger_pb2 import Failure as FailureMsg
from proto.fledger_pb2 import FitIns as FitInsMsg
from proto.fledger_pb2 import ForwardedUpdate as ForwardedUpdateMsg
from proto.fledger_pb2 import Head as HeadMsg
from proto.fledger_pb2 import JoinRequest as JoinRequestMsg
from proto.fledger_pb2 import MemberEntry as MemberEntryMsg
from proto.fledger_pb2 import NodeInfo as NodeInfoMsg
from proto.fledger_pb2 import PartialHeader as PartialHeaderMsg
from proto.fledger_pb2 import PartialPart as PartialPartMsg
from proto.fledger_pb2 import PromiseReply as PromiseReplyMsg
from proto.fledger_pb2 import ProposalInfo as ProposalInfoMsg
from proto.fledger_pb2 import RecordedUpdateHead as RecordedUpdateHeadMsg
from proto.fledger_pb2 import RoundAnnouncement as RoundAnnouncementMsg
from proto.fledger_pb2 import RoundPlan as RoundPlanMsg
from proto.fledger_pb2 import SignedBlock as SignedBlockMsg
from proto.fledger_pb2 import SignedRecord as SignedRecordMsg
from proto.fledger_pb2 import StatusReply as StatusReplyMsg
from proto.fledger_pb2 import TrainProgress as TrainProgressMsg

# Every decoder below raises BadRequestError, with a short message, and nothing else on bad input: wire bytes that
# do not parse (ValueError covers the chain's EncodingError and MalformedError) or values out of their bounds.

MAX_RULE_CHARS = 200   # an aggregation rule's text in a round plan (fl.robust spec)


def _check_samples(samples: int, what: str) -> int:
    if not 0 <= samples <= MAX_SAMPLES:
        raise BadRequestError(f"{what}: {samples} samples is out of range (0..2^40)")
    return int(samples)


def _check_hash(value: str, what: str) -> str:
    if not is_hex_digest(value):
        raise BadRequestError(f"{what} must be 64 lowercase hex digits, got {clip(value, 70)!r}")
    return value


# ---------------------------------------------------------------- records, blocks, co-signatures


def record_to_msg(record: SignedRecord) -> SignedRecordMsg:
    return SignedRecordMsg(record_bytes=record.record_bytes, signature=record.signature)


def record_from_msg(msg: SignedRecordMsg) -> SignedRecord:
    """A SignedRecord whose signature and id have been checked; BadRequestError otherwise."""
    record = SignedRecord(bytes(msg.record_bytes), bytes(msg.signature))
    try:
        record.check()
    except ValueError as exc:
        raise BadRequestError(f"bad update record: {clip(exc)}") from exc
    _check_samples(record.record.samples, f"update record of {record.record.trainer_id}")
    return record


def _unchecked_record(msg: SignedRecordMsg) -> SignedRecord:
    """A record parsed and bounded but whose signature is left to the ledger's verification of its block."""
    record = SignedRecord(bytes(msg.record_bytes), bytes(msg.signature))
    try:
        samples = record.record.samples
    except ValueError as exc:
        raise BadRequestError(f"bad update record: {clip(exc)}") from exc
    _check_samples(samples, f"update record of {record.record.trainer_id}")
    return record


def block_to_msg(block: SignedBlock) -> SignedBlockMsg:
    return SignedBlockMsg(header_bytes=block.header_bytes, signature=block.signature)


def block_from_msg(msg: SignedBlockMsg) -> SignedBlock:
    """A SignedBlock whose proposer signature and id have been checked; BadRequestError otherwise."""
    block = SignedBlock(bytes(msg.header_bytes), bytes(msg.signature))
    try:
        block.check()
    except ValueError as exc:
        raise BadRequestError(f"bad block: {clip(exc)}") from exc
    return block


def cosig_to_msg(cosig: Cosignature) -> CosignatureMsg:
    return CosignatureMsg(signer_key=cosig.signer_key, signature=cosig.signature)


def cosig_from_msg(msg: CosignatureMsg) -> Cosignature:
    """The signer's key checked for form only; validity depends on the block, see ``Cosignature.valid_for``."""
    if not is_hex_digest(msg.signer_key, PUBLIC_KEY_HEX_LEN) or len(msg.signature) > 128:
        raise BadRequestError(f"a co-signature needs a {PUBLIC_KEY_HEX_LEN}-hex-digit signer key and a signature")
    return Cosignature(msg.signer_key, bytes(msg.signature))


def block_parts(data: BlockData) -> Iterator[BlockPartMsg]:
    """One block as stream messages: block, records, co-signatures, weight chunks, then per recorded update its
    head and its weight chunks."""
    yield BlockPartMsg(block=block_to_msg(data.block))
    for record in data.records:
        yield BlockPartMsg(record=record_to_msg(record))
    for cosig in data.cosignatures:
        yield BlockPartMsg(cosignature=cosig_to_msg(cosig))
    for chunk in blob_chunks(data.weights_blob, data.block.header.model_hash):
        yield BlockPartMsg(weights=chunk)
    for update in data.updates:
        yield BlockPartMsg(recorded=RecordedUpdateHeadMsg(record=record_to_msg(update.record), status=update.status,
                                                          reason=update.reason))
        for chunk in blob_chunks(update.blob, update.record.record.update_hash):
            yield BlockPartMsg(weights=chunk)


# A recorded update being received: its record, status and reason, and the assembler of its weight chunks.
_Recorded = tuple[SignedRecord, str, str, WeightsAssembler]
# A block being received: the block, its records, co-signatures, model chunks and recorded updates.
_Incoming = tuple[SignedBlock, list[SignedRecord], list[Cosignature], WeightsAssembler, list[_Recorded]]


def read_blocks(parts: Iterable[BlockPartMsg], max_bytes: int = MAX_MODEL_BYTES) -> Iterator[BlockData]:
    """Group a stream of parts into blocks, checking only their structure, their records' sample counts and the
    blob's size (at most ``max_bytes``: a receiver that knows the model passes its size plus TRANSFER_SLACK_BYTES):
    the receiving ledger verifies each block once, whole (``Ledger.verify``: signatures, link, records, Merkle
    root, model, recorded updates). Weight chunks after a recorded update's head are that update's (each at most
    ``max_bytes``)."""
    current: _Incoming | None = None
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "block":
            if current is not None:
                yield _finish(*current)
            current = (SignedBlock(bytes(part.block.header_bytes), bytes(part.block.signature)), [], [],
                       WeightsAssembler(max_bytes), [])
        elif current is None:
            raise BadRequestError("a block stream must start with a block message")
        elif kind == "record":
            if len(current[1]) >= MAX_PARTICIPANTS:
                raise BadRequestError(f"a block carries at most {MAX_PARTICIPANTS} update records")
            current[1].append(_unchecked_record(part.record))
        elif kind == "cosignature":
            if len(current[2]) >= MAX_COSIGNATURES:
                raise BadRequestError(f"a block carries at most {MAX_COSIGNATURES} co-signatures")
            current[2].append(cosig_from_msg(part.cosignature))
        elif kind == "weights":
            (current[4][-1][3] if current[4] else current[3]).add(part.weights)
        elif kind == "recorded":
            if len(current[4]) >= MAX_PARTICIPANTS:
                raise BadRequestError(f"a block carries at most {MAX_PARTICIPANTS} recorded updates")
            current[4].append((*_recorded_head(part.recorded), WeightsAssembler(max_bytes)))
        elif kind == "info":
            raise BadRequestError("a proposal's info comes first, before its block")
        else:
            raise BadRequestError("empty block stream message")
    if current is not None:
        yield _finish(*current)


def _recorded_head(msg: RecordedUpdateHeadMsg) -> tuple[SignedRecord, str, str]:
    """A recorded update's record (signature left to the ledger, as for the block's records), status and reason."""
    record = _unchecked_record(msg.record)
    if msg.status not in STATUSES:
        raise BadRequestError(f"a recorded update's status must be one of {', '.join(STATUSES)}, got "
                              f"{clip(msg.status, 20)!r}")
    if len(msg.reason) > MAX_UPDATE_REASON_CHARS:
        raise BadRequestError(f"a recorded update's reason is at most {MAX_UPDATE_REASON_CHARS} characters")
    return record, msg.status, msg.reason


def _finish(block: SignedBlock, records: list[SignedRecord], cosigs: list[Cosignature],
            assembler: WeightsAssembler, updates: list[_Recorded]) -> BlockData:
    try:
        header = block.header
    except ValueError as exc:
        raise BadRequestError(f"bad block: {clip(exc)}") from exc
    if assembler.expected_hash != header.model_hash:
        raise BadRequestError(f"block {header.height}: the weights sent are not the block's model")
    recorded = []
    for record, status, reason, pieces in updates:
        if pieces.expected_hash != record.record.update_hash:
            raise BadRequestError(f"block {header.height}: the weights sent for the recorded update of "
                                  f"{record.record.trainer_id} are not the update its record names")
        recorded.append(RecordedUpdate(record, status, reason, pieces.finish_blob()))
    return BlockData(block, tuple(records), assembler.finish_blob(), tuple(cosigs), tuple(recorded))


def proposal_parts(data: BlockData, view: int, sender: str) -> Iterator[BlockPartMsg]:
    """A ProposeBlock stream: the view it is proposed in and who sends it, then the block."""
    yield BlockPartMsg(info=ProposalInfoMsg(view=view, sender_id=sender))
    yield from block_parts(data)


def read_proposal(parts: Iterator[BlockPartMsg], max_bytes: int) -> tuple[BlockData, int, str]:
    """(the one block, the view, the sender's node id) of a ProposeBlock stream, whose first message must say the
    view and the sender."""
    first = next(parts, None)
    if first is None or first.WhichOneof("part") != "info":
        raise BadRequestError("a proposal starts with its view and sender")
    check_node_id(first.info.sender_id, "the proposal's sender")
    blocks = list(read_blocks(parts, max_bytes=max_bytes))
    if len(blocks) != 1:
        raise BadRequestError(f"ProposeBlock carries exactly one block, got {len(blocks)}")
    return blocks[0], first.info.view, first.info.sender_id


def promise_to_msg(promise: Promise) -> PromiseReplyMsg:
    msg = PromiseReplyMsg(view=promise.view, head=head_to_msg(promise.head), target_round=promise.target_round)
    if promise.prepared is not None:
        msg.has_prepared = True
        msg.prepared_height, msg.prepared_hash, msg.prepared_view = promise.prepared
    return msg


def promise_from_msg(msg: PromiseReplyMsg) -> Promise:
    prepared = (msg.prepared_height, _check_hash(msg.prepared_hash, "the prepared block's hash"),
                msg.prepared_view) if msg.has_prepared else None
    return Promise(msg.view, head_from_msg(msg.head), prepared, msg.target_round)


def head_to_msg(head: ChainHead | None) -> HeadMsg:
    if head is None:
        return HeadMsg(empty=True)
    return HeadMsg(height=head.height, hash=head.hash, model_hash=head.model_hash)


def head_from_msg(msg: HeadMsg) -> ChainHead | None:
    if msg.empty:
        return None
    return ChainHead(msg.height, _check_hash(msg.hash, "a head's hash"), _check_hash(msg.model_hash, "its model hash"))


# ---------------------------------------------------------------- training


def fit_ins_to_msg(ins: FitIns) -> FitInsMsg:
    return FitInsMsg(round=ins.round, epochs=ins.epochs, batch_size=ins.batch_size, lr=ins.lr,
                     momentum=ins.momentum, seed=ins.seed)


def _check_training(epochs: int, batch_size: int, lr: float, momentum: float) -> None:
    if not 1 <= epochs <= MAX_LOCAL_EPOCHS or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise BadRequestError(f"training instructions need epochs in 1..{MAX_LOCAL_EPOCHS} and batch_size in "
                              f"1..{MAX_BATCH_SIZE}, got {epochs}, {batch_size}")
    if not (math.isfinite(lr) and 0 < lr <= MAX_LR) or not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise BadRequestError(f"training instructions need lr in (0, {MAX_LR:g}] and momentum in [0, 1), "
                              f"got {lr}, {momentum}")


def fit_ins_from_msg(msg: FitInsMsg) -> FitIns:
    """FitIns with sane values; BadRequestError naming the bad field otherwise."""
    _check_training(msg.epochs, msg.batch_size, msg.lr, msg.momentum)
    return FitIns(round=msg.round, epochs=msg.epochs, batch_size=msg.batch_size, lr=msg.lr,
                  momentum=msg.momentum, seed=msg.seed)


def announcement_to_msg(ann: Announcement) -> RoundAnnouncementMsg:
    plan = ann.plan
    return RoundAnnouncementMsg(round=ann.round, base_height=ann.base_height, base_model_hash=ann.base_model_hash,
                                proposer_id=ann.proposer_id, participants=list(ann.participants),
                                plan=RoundPlanMsg(algorithm=plan.algorithm, lr=plan.lr,
                                                  local_epochs=plan.local_epochs, batch_size=plan.batch_size,
                                                  momentum=plan.momentum, seed=plan.seed,
                                                  aggregate=plan.aggregate, record_updates=plan.record_updates),
                                view=ann.view, target_round=ann.target_round)


def _aggregate_rule(text: str) -> str:
    """A round plan's aggregation rule in its normal form (fl.robust); "" is "fedavg"."""
    if not text:
        return "fedavg"
    if len(text) > MAX_RULE_CHARS:
        raise BadRequestError(f"the round plan's aggregation rule is over {MAX_RULE_CHARS} characters")
    try:
        return parse_rule(text).spec()
    except ValueError as exc:
        raise BadRequestError(f"bad aggregation rule in the round plan: {clip(exc)}") from exc


def announcement_from_msg(msg: RoundAnnouncementMsg) -> Announcement:
    """An announcement with a known algorithm and aggregation rule, sane training values and each participant
    once."""
    plan = msg.plan
    if plan.algorithm not in ("fedavg", "fedper"):
        raise BadRequestError(f"unknown algorithm {clip(plan.algorithm, 40)!r} in the round plan")
    aggregate = _aggregate_rule(plan.aggregate)
    _check_training(plan.local_epochs, plan.batch_size, plan.lr, plan.momentum)
    check_node_id(msg.proposer_id, "the proposer's id")
    _check_hash(msg.base_model_hash, "the base model hash")
    if len(msg.participants) > MAX_PARTICIPANTS:
        raise BadRequestError(f"an announcement names at most {MAX_PARTICIPANTS} edge nodes")
    for node_id in msg.participants:
        check_node_id(node_id, "a participant's id")
    if len(set(msg.participants)) != len(msg.participants):
        raise BadRequestError("the announcement lists an edge node twice")
    return Announcement(msg.round, msg.base_height, msg.base_model_hash, msg.proposer_id, tuple(msg.participants),
                        Plan(plan.algorithm, plan.lr, plan.local_epochs, plan.batch_size, plan.momentum, plan.seed,
                             aggregate, plan.record_updates),
                        msg.view, msg.target_round)


def metrics_to_msg(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics for a ``map<string, double>`` field (finite floats only)."""
    return {str(k): float(v) for k, v in metrics.items() if math.isfinite(v)}


def metrics_from_msg(metrics: Mapping[str, float]) -> dict[str, float]:
    """Named finite numbers: at most MAX_METRICS of them, names of at most MAX_METRIC_NAME_CHARS characters."""
    if len(metrics) > MAX_METRICS:
        raise BadRequestError(f"at most {MAX_METRICS} metrics may be sent, got {len(metrics)}")
    out = {str(k): float(v) for k, v in metrics.items()}
    if any(len(k) > MAX_METRIC_NAME_CHARS for k in out):
        raise BadRequestError(f"metric names are at most {MAX_METRIC_NAME_CHARS} characters")
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise BadRequestError(f"metrics {clip(bad)} are not finite numbers")
    return out


def eval_to_msg(res: EvalRes) -> EvalReplyMsg:
    return EvalReplyMsg(loss=res.loss, accuracy=res.accuracy, samples=res.samples)


def eval_from_msg(msg: EvalReplyMsg) -> EvalRes:
    return EvalRes(loss=msg.loss, accuracy=msg.accuracy, samples=_check_samples(msg.samples, "an evaluation"))


def partial_parts(partial: Partial) -> Iterator[PartialPartMsg]:
    """A partial as stream messages: header, records, weight chunks, then per forwarded update (``Plan.forwards``)
    its record and its weight chunks."""
    yield PartialPartMsg(header=PartialHeaderMsg(
        round=partial.round, sn_id=partial.sn_id, samples=partial.samples,
        failures=[FailureMsg(node_id=n, reason=clip(r, MAX_REASON_CHARS)) for n, r in partial.failures],
        metrics=metrics_to_msg(partial.metrics), timings=metrics_to_msg(partial.timings)))
    for record in partial.records:
        yield PartialPartMsg(record=record_to_msg(record))
    if partial.weights is not None:
        for chunk in send_weights(partial.weights):
            yield PartialPartMsg(weights=chunk)
    for update in partial.updates:
        yield PartialPartMsg(update=ForwardedUpdateMsg(record=record_to_msg(update.record)))
        # the update's hash is the one its edge node signed (and its super node checked on arrival): not hashed again
        for chunk in blob_chunks(encode_weights(update.weights), update.record.record.update_hash):
            yield PartialPartMsg(weights=chunk)


def read_partial(parts: Iterable[PartialPartMsg], max_bytes: int = MAX_MODEL_BYTES) -> Partial:
    """Reassemble a partial (records signed, weights whole, at most ``max_bytes``, and hashing as announced;
    each forwarded update's weights hashing to its record's update_hash); the proposer then checks it against its
    round with ``partial.check_partial``."""
    stream = iter(parts)
    first = next(stream, None)
    if first is None or first.WhichOneof("part") != "header":
        raise BadRequestError("a partial must start with its header")
    head = first.header
    check_node_id(head.sn_id, "a partial's super node id")
    _check_samples(head.samples, "a partial")
    if len(head.failures) > MAX_PARTICIPANTS:
        raise BadRequestError(f"a partial lists at most {MAX_PARTICIPANTS} failures")
    for failure in head.failures:
        check_node_id(failure.node_id, "a failed node's id")
    records: list[SignedRecord] = []
    assembler = WeightsAssembler(max_bytes)
    updates: list[Update] = []
    forwarded: tuple[SignedRecord, WeightsAssembler] | None = None   # the update whose chunks are arriving
    for part in stream:
        kind = part.WhichOneof("part")
        if kind == "record":
            if len(records) >= MAX_PARTICIPANTS:
                raise BadRequestError(f"a partial carries at most {MAX_PARTICIPANTS} update records")
            records.append(record_from_msg(part.record))
        elif kind == "weights":
            (forwarded[1] if forwarded is not None else assembler).add(part.weights)
        elif kind == "update":
            if forwarded is not None:
                updates.append(_forwarded_update(*forwarded))   # decoded now: its buffer is freed
            if len(updates) >= MAX_PARTICIPANTS:
                raise BadRequestError(f"a partial carries at most {MAX_PARTICIPANTS} forwarded updates")
            forwarded = (record_from_msg(part.update.record), WeightsAssembler(max_bytes))
        else:
            raise BadRequestError(f"unexpected {kind!r} message inside a partial")
    if forwarded is not None:
        updates.append(_forwarded_update(*forwarded))
    weights = assembler.finish()[0] if assembler.started else None
    return Partial(head.sn_id, head.round, int(head.samples), weights, records,
                   [(f.node_id, clip(f.reason, MAX_REASON_CHARS)) for f in head.failures],
                   metrics_from_msg(head.metrics),
                   metrics_from_msg(head.timings), updates=updates)


def _forwarded_update(record: SignedRecord, assembler: WeightsAssembler) -> Update:
    """A forwarded update whose weights (whole, decoded, hashing as announced) are the ones its record names."""
    trainer = record.record.trainer_id
    if not assembler.started:
        raise BadRequestError(f"update of edge {trainer} came without its weights")
    try:
        weights, digest = assembler.finish()
    except BadRequestError as exc:   # the weights do not hash to what was announced for them
        raise BadRequestError(f"update of edge {trainer} does not match its signed record: {clip(exc)}") from exc
    if not hmac.compare_digest(digest.encode(), record.record.update_hash.encode()):
        raise BadRequestError(f"update of edge {trainer} does not match its signed record")
    return Update(record, weights)


# ---------------------------------------------------------------- membership and the operator's views


def member_to_msg(member: Member, alive: bool = True, silent_s: float = 0.0, role: str = "",
                  parent_id: str = "") -> MemberEntryMsg:
    info = NodeInfoMsg(node_id=member.node_id, public_key=member.public_key, address=member.address,
                       capacity=member.capacity, samples=member.samples, partition_index=member.share)
    return MemberEntryMsg(info=info, load=member.load, alive=alive, role=role, parent_id=parent_id,
                          silent_s=max(0.0, silent_s))


def view_to_msg(view: MemberView) -> MemberEntryMsg:
    info = NodeInfoMsg(node_id=view.node_id, public_key=view.public_key, address=view.address,
                       capacity=view.capacity, samples=view.samples, partition_index=view.share)
    return MemberEntryMsg(info=info, load=view.load, alive=view.alive, role=view.role, parent_id=view.parent_id,
                          silent_s=max(0.0, view.silent_s), unreachable=view.unreachable)


def _check_info(info: NodeInfoMsg) -> None:
    """A member as a peer lists it: fields of bounded size (their form is the listing node's business)."""
    if (len(info.node_id) > NODE_ID_HEX_LEN or len(info.public_key) > PUBLIC_KEY_HEX_LEN
            or len(info.address) > MAX_ADDRESS_CHARS):
        raise BadRequestError("a listed member's id, key or address is over its size limit")
    _check_samples(info.samples, "a listed member")


def view_from_msg(msg: MemberEntryMsg) -> MemberView:
    info = msg.info
    _check_info(info)
    return MemberView(info.node_id, info.public_key, info.address, msg.role, msg.alive, msg.silent_s,
                      msg.parent_id, msg.load, info.capacity, info.samples,
                      info.partition_index if info.HasField("partition_index") else None,
                      clip(msg.unreachable, 200))


def edge_ref_from_msg(msg: MemberEntryMsg) -> EdgeRef:
    """An edge node to call: its id and address must be usable as such."""
    info = msg.info
    check_node_id(info.node_id, "a listed edge node's id")
    check_address(info.address, f"edge node {info.node_id}")
    return EdgeRef(info.node_id, info.address, info.partition_index if info.HasField("partition_index") else None,
                   info.samples)


def status_to_msg(status: NodeStatus) -> StatusReplyMsg:
    return StatusReplyMsg(node_id=status.node_id, role=status.role, head=head_to_msg(status.head),
                          edges=status.edges, supernodes=status.supernodes, training=status.training,
                          paused=status.paused, round=status.round, validators=list(status.validators),
                          view=status.view, proposer=status.proposer, ledger_error=status.ledger_error)


def status_from_msg(msg: StatusReplyMsg) -> NodeStatus:
    return NodeStatus(msg.node_id, msg.role, head_from_msg(msg.head), msg.edges, msg.supernodes, msg.training,
                      msg.paused, msg.round, validators=tuple(msg.validators), view=msg.view,
                      proposer=clip(msg.proposer, 40), ledger_error=clip(msg.ledger_error, 300))


MAX_EXCLUDED = 64   # excluded updates a TrainProgress lists at most (the round line needs only the first few)


def progress_to_msg(progress: Progress) -> TrainProgressMsg:
    """A finished round, or a note about one."""
    if not isinstance(progress, RoundReport):
        return TrainProgressMsg(round=progress.round, message=progress.message, error=progress.error)
    block = progress.block
    return TrainProgressMsg(round=progress.round, height=block.header.height, block_hash=block.hash,
                            participants=progress.participants, failures=len(progress.failures),
                            metrics=metrics_to_msg(progress.metrics), timings=metrics_to_msg(progress.timings),
                            message="; ".join(f"{n[:12]}: {why}" for n, why in progress.failures[:3]),
                            excluded=[FailureMsg(node_id=n, reason=clip(why, MAX_REASON_CHARS))
                                      for n, why in progress.excluded[:MAX_EXCLUDED]],
                            dropped=[FailureMsg(node_id=n, reason=clip(why, MAX_REASON_CHARS))
                                     for n, why in progress.dropped[:MAX_EXCLUDED]])


def dropped_from_msg(msg: TrainProgressMsg) -> list[tuple[str, str]]:
    """(edge id, why) of the selected edge nodes a scenario's round did not train, bounded as written."""
    return [(clip(f.node_id, NODE_ID_HEX_LEN), clip(f.reason, MAX_REASON_CHARS)) for f in msg.dropped[:MAX_EXCLUDED]]


def excluded_from_msg(msg: TrainProgressMsg) -> list[tuple[str, str]]:
    """(edge id, why) of the updates a round refused or left out, bounded like progress_to_msg writes them."""
    return [(clip(f.node_id, NODE_ID_HEX_LEN), clip(f.reason, MAX_REASON_CHARS)) for f in msg.excluded[:MAX_EXCLUDED]]


def eval_report_to_msg(report: EvalReport) -> EvalReplyMsg:
    return EvalReplyMsg(loss=report.loss, accuracy=report.accuracy, samples=report.samples,
                        edges=[EdgeEvalMsg(node_id=e.node_id, loss=e.loss, accuracy=e.accuracy, samples=e.samples,
                                           error=e.error) for e in report.edges],
                        edge_accuracy_mean=report.edge_accuracy_mean, edge_accuracy_min=report.edge_accuracy_min,
                        edge_accuracy_max=report.edge_accuracy_max)


def eval_report_from_msg(msg: EvalReplyMsg) -> EvalReport:
    return EvalReport(msg.loss, msg.accuracy, msg.samples,
                      [EdgeEval(e.node_id, e.loss, e.accuracy, e.samples, e.error) for e in msg.edges],
                      msg.edge_accuracy_mean, msg.edge_accuracy_min, msg.edge_accuracy_max)


# ---- joining a secure network -------------------------------------------------------------------------------------

MAX_JOIN_HOSTS = 16


def join_request_to_msg(request: JoinRequest) -> JoinRequestMsg:
    return JoinRequestMsg(role=request.role, token_id=request.token_id, public_key=request.public_key,
                          tls_public_key=request.tls_public_key, hosts=list(request.hosts), nonce=request.nonce,
                          key_proof=request.key_proof, mac=request.mac)


def join_request_from_msg(msg: JoinRequestMsg) -> JoinRequest:
    """The request as the enroller checks it; sizes bounded here so nothing large reaches the crypto."""
    if len(msg.hosts) > MAX_JOIN_HOSTS or any(len(h) > 253 for h in msg.hosts):
        raise BadRequestError(f"a join request names at most {MAX_JOIN_HOSTS} hosts of at most 253 characters")
    if len(msg.tls_public_key) > 4096 or len(msg.role) > 16 or len(msg.token_id) > 64 \
            or len(msg.public_key) > 128 or len(msg.nonce) > 64 or len(msg.key_proof) > 128 or len(msg.mac) > 64:
        raise BadRequestError("a join request field is over its size limit")
    return JoinRequest(msg.role, msg.token_id, msg.public_key, bytes(msg.tls_public_key), tuple(msg.hosts),
                       bytes(msg.nonce), bytes(msg.key_proof), bytes(msg.mac))
