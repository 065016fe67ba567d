"""Secure mode's identities: the network's CA, node and admin certificates, join tokens and the enrollment handshake.
No grpc. May import chain and node.security only."""
