"""The simulator: the network in one process, through the engine's in-process peers and participants.

May import node.engine, node.run, node.ledger, chain, fl, storage, config; never grpc, protobuf or node.rpc."""
