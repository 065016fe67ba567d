"""The edge node process: its EdgeCore behind the EdgeNode service, joining the super node the entry assigns and
heartbeating there (asking again when it is forgotten or its super node is gone); and a host for several."""
from __future__ import annotations

import logging
import threading
import time

from node.engine.edge import EdgeCore
from node.engine.errors import NetError, NotFoundError, UnavailableError
from node.engine.pacing import Pacer
from node.engine.views import MemberView
from node.rpc import transport
from node.rpc.clients import RegistryClient
from node.rpc.security import Authorizer
from node.rpc.services import add_edge_service
from node.security.pki import TlsCredentials

log = logging.getLogger(__name__)

SERVICE = "fledger.v1.EdgeNode"
STOP_WAIT_S = 5.0   # stop() waits this long (and the gRPC grace) at most for the membership loop and the server


class EdgeNode:
    """An edge node: serves EdgeNode, joins the super node the entry assigns and keeps heartbeating."""

    def __init__(self, core: EdgeCore, listen: str, entry: str, advertise_host: str = "127.0.0.1",
                 advertise_port: int | None = None, heartbeat_interval: float = 2.0,
                 security: TlsCredentials | None = None, pacer: Pacer | None = None):
        self.core = core
        self.security = security   # secure mode: this edge node's certificate
        self.key = core.key
        self.entry = entry
        self.heartbeat_interval = heartbeat_interval
        self.server, self.port = transport.create_server(listen, services=[SERVICE], security=security)
        self.address = f"{advertise_host}:{advertise_port or self.port}"
        self.info = MemberView(self.key.node_id, self.key.public_hex, self.address, "edge", True,
                               samples=core.samples, share=core.share)
        add_edge_service(self.server, core, self.info, authorize=Authorizer() if security is not None else None,
                         pacer=pacer)
        self.registry = RegistryClient(entry, security=security)
        self.supernode: str | None = None   # address of the super node this edge node is registered with
        self.known: list[str] = []          # the other super nodes' addresses, as the entry last listed them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._membership_loop, name="en-heartbeat", daemon=True)

    def start(self) -> None:
        self.server.start()
        self._thread.start()
        log.info("edge node %s serving on %s; entry %s", self.key.node_id, self.address, self.entry)

    def stop(self, grace: float | None = 2.0) -> None:
        self.halt()
        self.finish(self.server.stop(grace), time.monotonic() + STOP_WAIT_S + (grace or 0))

    def halt(self) -> None:
        """Stop the membership loop: no more joins or heartbeats (it ends within its current call's deadline)."""
        self._stop.set()

    def finish(self, stopped: threading.Event, deadline: float) -> None:
        """Wait, until ``deadline`` at most, for the membership loop and the server (``stopped``: server.stop's)."""
        if self._thread.is_alive():
            self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if not stopped.wait(timeout=max(0.0, deadline - time.monotonic())):
            log.warning("edge node %s: the server did not stop in time", self.key.node_id)

    def join(self) -> str:
        """Ask the entry for a super node, then register there; return its address (raises NetError). While the
        entry cannot be reached, ask the other super nodes it listed before: any of them takes the edge node."""
        try:
            assigned = self.registry.assign(self.info)
        except UnavailableError as exc:
            assigned = self._assign_elsewhere(exc)
        else:
            self._learn_supernodes()
        interval = self.registry.register_edge(assigned.address, self.info)
        if interval > 0:
            self.heartbeat_interval = interval
        self.supernode = assigned.address
        log.info("joined super node %s at %s", assigned.node_id, self.supernode)
        return self.supernode

    def _learn_supernodes(self) -> None:
        """Remember the super nodes the entry lists, to register through one of them should the entry go away."""
        try:
            self.known = [m.address for m in self.registry.supernodes() if m.address != self.entry]
        except NetError as exc:
            log.debug("cannot list the super nodes: %s", exc)

    def _assign_elsewhere(self, cause: UnavailableError) -> MemberView:
        for address in self.known:
            try:
                return RegistryClient(address, security=self.security).assign(self.info)
            except NetError as exc:
                log.debug("super node %s cannot take this edge node: %s", address, exc)
        raise cause

    def _membership_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.supernode is None:
                    self.join()
                else:
                    self.registry.edge_heartbeat(self.supernode, self.key.node_id)
            except (NotFoundError, UnavailableError) as exc:
                log.warning("membership: %s; asking the entry for a super node again", exc)
                self.supernode = None   # forgotten or gone
            except NetError as exc:
                log.warning("membership: %s", exc)
            self._stop.wait(self.heartbeat_interval)


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
        """Stop every node at once (one at a time, the last ones kept heartbeating for many seconds), each within
        the same deadline; one that fails to stop does not keep the others running."""
        for node in self.nodes:
            node.halt()
        deadline = time.monotonic() + STOP_WAIT_S + (grace or 0)
        stopped: list[tuple[EdgeNode, threading.Event]] = []
        errors: list[Exception] = []
        for node in self.nodes:
            try:
                stopped.append((node, node.server.stop(grace)))
            except Exception as exc:   # stop the others all the same; raised below
                errors.append(exc)
        for node, event in stopped:
            node.finish(event, deadline)
        if errors:
            raise errors[0]
