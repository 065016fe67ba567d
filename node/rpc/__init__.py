"""The wire layer, the only code that imports grpc or protobuf: channel and server options, transport (servers,
chunked weights, error mapping), serde (every message <-> domain value), clients (the engine's seams over gRPC,
the registry and admin clients) and the thin servicers.

May import node.engine, node.ledger, node.security, chain, fl, proto; nothing below it imports it."""
