"""Node processes: a super node or edge node wired from its domain objects (node.engine) and its gRPC services
(node.rpc), with its membership loop, and the launcher that runs one from a Config.

May import node.engine, node.rpc, node.security, node.run, node.ledger, chain, fl, config; only node.cli imports it."""

READY_FILE = "node.json"   # a node writes {"address", "node_id", "type", ...} here once it serves
# Set by whoever starts a node as its child (the cluster command): that process's pid. The node then gets SIGTERM when
# it dies, even by SIGKILL, so no node is orphaned (Linux prctl PR_SET_PDEATHSIG, set in the node itself).
PARENT_ENV = "FLEDGER_PARENT_PID"
