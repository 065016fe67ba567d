"""The admin console: command parsing (pure), the commands over an Admin client, and the REPL.

May import node.rpc.clients, node.engine (errors and views), node.security (the operator identity), chain; never
grpc or protobuf directly."""
