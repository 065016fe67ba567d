"""The Admin service the console talks to, on every super node (training runs on the entry only). Thin."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import grpc

from node import serde, transport
from node.coordinator import RoundReport
from node.errors import UnknownNodeError
from node.sn_services import head_msg
from proto import fledger_pb2_grpc
from proto.fledger_pb2 import BlockView as BlockViewMsg
from proto.fledger_pb2 import Empty as EmptyMsg
from proto.fledger_pb2 import MemberList as MemberListMsg
from proto.fledger_pb2 import SaveReply as SaveReplyMsg
from proto.fledger_pb2 import StatusReply as StatusReplyMsg
from proto.fledger_pb2 import TrainProgress as TrainProgressMsg
from proto.fledger_pb2 import VerifyReply as VerifyReplyMsg

if TYPE_CHECKING:
    from node.supernode import SuperNode


def progress_msg(report: RoundReport | None, round: int, message: str) -> TrainProgressMsg:
    """A TrainProgress for a finished round (or, without a report, a note about ``round``)."""
    if report is None:
        return TrainProgressMsg(round=round, message=message)
    block = report.block
    return TrainProgressMsg(round=report.round, height=block.header.height, block_hash=block.hash,
                            participants=report.participants, failures=len(report.failures),
                            metrics=serde.metrics_to_msg({k: v for k, v in report.metrics.items() if math.isfinite(v)}),
                            timings=serde.metrics_to_msg(report.timings),
                            message="; ".join(f"{n[:12]}: {why}" for n, why in report.failures[:3]) or message)


class AdminServicer(fledger_pb2_grpc.AdminServicer):
    """Thin: console queries and commands over one SuperNode."""

    def __init__(self, node: "SuperNode"):
        self.node = node
        self.ledger, self.key, self.edges, self.registry = node.ledger, node.key, node.edges, node.registry

    def Status(self, request, context):
        trainer = self.node.trainer
        tip = self.ledger.tip
        return StatusReplyMsg(node_id=self.key.node_id, role="entry" if self.registry is not None else "supernode",
                              head=head_msg(self.ledger), edges=len(self.edges),
                              supernodes=len(self.registry) if self.registry is not None else 0,
                              training=bool(trainer and trainer.training),
                              paused=bool(trainer and trainer.pause_requested),
                              round=trainer.current_round if trainer else (tip.header.round if tip else 0))

    def Train(self, request, context):
        trainer = self.node.trainer
        if trainer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"training runs on the entry super node ({self.node.entry}); connect the console there")
        if self.ledger.tip is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the chain has no genesis block yet")
        job, started = trainer.start(request.rounds)
        if not started:
            yield TrainProgressMsg(round=trainer.current_round,
                                   message=f"already training rounds {job.first_round}-{job.last_round}; "
                                           "following that run")
        yield from trainer.follow(job, alive=context.is_active)

    def Pause(self, request, context):
        if self.node.trainer is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"training runs on the entry super node ({self.node.entry}); pause it there")
        self.node.trainer.pause()
        return EmptyMsg()

    @transport.guarded
    def Save(self, request, context):
        path, digest = self.node.save_model(request.path or None)
        return SaveReplyMsg(path=str(path), model_hash=digest)

    @transport.guarded
    def Eval(self, request, context):
        return self.node.evaluate()

    def ListNodes(self, request, context):
        return MemberListMsg(members=self.node.network_view())

    @transport.guarded
    def GetBlock(self, request, context):
        tip = self.ledger.tip
        if tip is None or request.height > tip.header.height:
            raise UnknownNodeError(f"no block at height {request.height}")
        self.ledger.flush()
        block, records = self.ledger.get_block(request.height)
        return BlockViewMsg(block=serde.block_to_msg(block), records=[serde.record_to_msg(r) for r in records],
                            hash=block.hash)

    def Verify(self, request, context):
        try:
            report = self.ledger.verify()
        except Exception as exc:  # VerificationError names height and check; the console shows it
            return VerifyReplyMsg(ok=False, message=str(exc))
        return VerifyReplyMsg(ok=True, blocks=report.blocks, message=f"head {report.head_height} {report.head_hash}")
