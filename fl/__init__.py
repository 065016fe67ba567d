"""Federated-learning core: data, partitions, models, local training, aggregation and the round loop (no ledger, no network)."""
