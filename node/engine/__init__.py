"""The one round engine and the domain of a ledgered FL network: edge and super node roles, the proposer's round,
consensus, sync, membership and training jobs. Written once for the simulator and the network: super nodes and
edge nodes are reached through two seams (engine.types.Peer and EdgeDirectory), with in-process implementations
here and gRPC ones in node.rpc.

May import chain, fl, storage, config, node.ledger and node.run; never grpc, protobuf or other node packages."""
