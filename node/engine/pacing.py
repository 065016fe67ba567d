"""A scenario on the real network: each node spends its own profile's time for real, computed by the very formulas
the virtual clock plans with (node.engine.clock), so a measured round can be held against its plan.

An edge node holds a transfer until the time its link would take (from when its first byte arrived), pads its
training to its device's compute time, and holds its answer for its uplink's time; a super node that is not the
proposer holds the announcement, its partial, a proposed block and a commit for the backbone's time. Loopback
moves the bytes almost at once, so the waits are the link's time; with ``shape_links`` off only compute is paced
and the kernel shapes the links (tc tbf), which is how the bandwidth model is checked independently. No wait is
longer than the call's own deadline: a cancelled call ends its wait."""
from __future__ import annotations

import logging
import threading
import time

from node.engine.clock import VirtualClock, announce_s, block_s, commit_s, partial_s

log = logging.getLogger(__name__)


def hold_until(deadline: float, cancel: threading.Event | None = None) -> None:
    """Sleep until ``deadline`` (time.monotonic), or until ``cancel`` is set."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return
    if cancel is not None:
        cancel.wait(remaining)
    else:
        time.sleep(remaining)


class Pacer:
    """One node's pacing under a scenario's clock."""

    def __init__(self, clock: VirtualClock, shape_links: bool = True):
        self.clock = clock
        self.shape_links = shape_links
        self._warned = False

    # ---- an edge node ------------------------------------------------------------------------------------------

    def edge_download(self, index: int, round: int, nbytes: int, since: float,
                      cancel: threading.Event | None = None) -> None:
        if self.shape_links:
            hold_until(since + self.clock.down_s(index, round, nbytes), cancel)

    def edge_compute(self, index: int, samples: int, epochs: int, since: float,
                     cancel: threading.Event | None = None) -> None:
        target = self.clock.compute_s(index, samples, epochs)
        spent = time.monotonic() - since
        if spent > target * 1.05 and not self._warned:
            self._warned = True
            log.warning("edge %d trained for %.2f s, longer than its device profile's %.2f s: this machine is "
                        "slower than the profile (or shared by many edge nodes), so rounds here take longer than "
                        "the simulator predicts", index, spent, target)
        hold_until(since + target, cancel)

    def edge_upload(self, index: int, round: int, nbytes: int, cancel: threading.Event | None = None) -> None:
        if self.shape_links:
            hold_until(time.monotonic() + self.clock.up_s(index, round, nbytes), cancel)

    # ---- a super node that is not the proposer -----------------------------------------------------------------

    def announcement(self, since: float) -> None:
        if self.shape_links:
            hold_until(since + announce_s(self.clock.scenario.backbone))

    def partial(self, nbytes: int) -> None:
        if self.shape_links:
            hold_until(time.monotonic() + partial_s(self.clock.scenario.backbone, nbytes))

    def proposal(self, nbytes: int, since: float) -> None:
        if self.shape_links:
            hold_until(since + block_s(self.clock.scenario.backbone, nbytes))

    def commit(self, since: float) -> None:
        if self.shape_links:
            hold_until(since + commit_s(self.clock.scenario.backbone))
