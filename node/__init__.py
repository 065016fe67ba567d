"""Nodes and wiring: the ledger service, the round recorder, the simulator, the gRPC super and edge nodes."""
