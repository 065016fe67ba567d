"""Node processes: a super node or edge node wired from its domain objects (node.engine) and its gRPC services
(node.rpc), with its membership loop, and the launcher that runs one from a Config.

May import node.engine, node.rpc, node.security, node.run, node.ledger, chain, fl, config; only node.cli imports it."""

READY_FILE = "node.json"   # a node writes {"address", "node_id", "type", ...} here once it serves
